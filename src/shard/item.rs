//! One stored key and value in a single allocation.
//!
//! ```text
//!  table slot (16 B): Item (thin pointer) | expire_at_ms
//!                        |
//!                        v  one heap block
//!  [ref count 8 | key length 4 (+4) | length 8 | key bytes | value bytes ]
//! ```
//!
//! The block is a `triomphe::ThinArc`: an atomically counted, thin (8-byte) pointer to a
//! header and a byte slice. Compared with a key `Bytes` and a value `Bytes` in the slot
//! (72 bytes, two allocations), a small item saves a heap allocation and 56 bytes of slot.
//! The count lets a GET hand the value out without copying it ([`Item::value_bytes`]) and
//! a snapshot hold the items it writes while the shard goes on changing.

use bytes::Bytes;
use triomphe::{HeaderWithLength, ThinArc, UniqueArc};

/// Bytes the allocator adds to every block (glibc malloc: an 8-byte chunk header).
const ALLOC_HEADER_BYTES: u64 = 8;

/// A key and its value, immutable once built: a write replaces the item.
#[derive(Clone)]
pub struct Item(ThinArc<u32, u8>);

impl Item {
    /// Copies `key` and `value` into one new block.
    pub fn new(key: &[u8], value: &[u8]) -> Item {
        let len = key.len() + value.len();
        let key_len = u32::try_from(key.len()).expect("keys are far below 4 GiB (limits.key_bytes_max)");
        let mut block = UniqueArc::from_header_and_uninit_slice(HeaderWithLength::new(key_len, len), len);
        let dst = block.slice.as_mut_ptr().cast::<u8>();
        // SAFETY: `dst` points to `len` writable bytes, which the two copies fill exactly,
        // so the slice is initialised before `assume_init_slice_with_header`; the sources
        // are the caller's slices, which cannot overlap a block allocated just now.
        let block = unsafe {
            std::ptr::copy_nonoverlapping(key.as_ptr(), dst, key.len());
            std::ptr::copy_nonoverlapping(value.as_ptr(), dst.add(key.len()), value.len());
            block.assume_init_slice_with_header()
        };
        Item(triomphe::Arc::into_thin(block.shareable()))
    }

    #[inline]
    pub fn key(&self) -> &[u8] {
        &self.0.slice[..self.key_len()]
    }

    #[inline]
    pub fn value(&self) -> &[u8] {
        &self.0.slice[self.key_len()..]
    }

    #[inline]
    fn key_len(&self) -> usize {
        self.0.header.header as usize
    }

    /// The value as `Bytes` that share this block: no copy, one count.
    pub fn value_bytes(&self) -> Bytes {
        Bytes::from_owner(ValueOf(self.clone()))
    }

    /// The block's size as the allocator sees it (what it costs in memory).
    pub fn heap_bytes(&self) -> u64 {
        // SAFETY: `heap_ptr` is the start of the live block glibc's malloc returned (the
        // global allocator is the system one), which is what malloc_usable_size expects.
        let usable = unsafe { libc::malloc_usable_size(self.0.heap_ptr().cast_mut()) };
        usable as u64 + ALLOC_HEADER_BYTES
    }

    /// Whether `self` and `other` are the same block (not merely equal bytes).
    #[inline]
    pub fn same(&self, other: &Item) -> bool {
        self.0.heap_ptr() == other.0.heap_ptr()
    }

    /// The block's address: orders items in the deadline index, where two entries with the
    /// same deadline are told apart by the block they point to.
    #[inline]
    pub fn address(&self) -> usize {
        self.0.heap_ptr() as usize
    }
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item")
            .field("key", &Bytes::copy_from_slice(self.key()))
            .field("value_len", &self.value().len())
            .finish()
    }
}

/// The value part of an item, as a `Bytes` owner.
struct ValueOf(Item);

impl AsRef<[u8]> for ValueOf {
    fn as_ref(&self) -> &[u8] {
        self.0.value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: an item gives back exactly the key and value it was built from (empty ones
    // too), shares its block with the Bytes a GET hands out, and reports what it costs.
    #[test]
    fn item_round_trip() {
        for (k, v) in [(&b""[..], &b""[..]), (b"k", b""), (b"", b"v"), (b"user_1_2", b"value_3")] {
            let item = Item::new(k, v);
            assert_eq!((item.key(), item.value()), (k, v));
        }
        let item = Item::new(b"key", &[7u8; 1000]);
        let value = item.value_bytes();
        assert_eq!(&value[..], &[7u8; 1000][..]);
        assert_eq!(value.as_ptr(), item.value().as_ptr(), "no copy");
        drop(item);
        assert_eq!(value.len(), 1000, "the value outlives the item that made it");
        let small = Item::new(b"user_1_2", b"0123456789abcdef");
        assert!((48..=96).contains(&small.heap_bytes()), "{}", small.heap_bytes());
        assert!(small.same(&small.clone()) && !small.same(&Item::new(b"user_1_2", b"0123456789abcdef")));
    }
}
