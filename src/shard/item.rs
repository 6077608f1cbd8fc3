//! One stored key, its value and its deadline, in a single allocation behind an 8-byte
//! table slot.
//!
//! ```text
//!  table slot: Item (8 B, a pointer)
//!                 |
//!                 v  one heap block
//!  [ refs 4 | key_len 4 | value_len 4 | touched 4 | expire_at_ms 8 | key bytes | value bytes ]
//! ```
//!
//! Compared with a key `Bytes`, a value `Bytes` and a deadline in the slot (72 bytes and two
//! allocations), a small item saves an allocation and 64 bytes of slot, and the table's
//! empty buckets cost 9 bytes instead of 73. The reference count lets a GET hand the value
//! out without copying it ([`Item::value_bytes`]) and a snapshot hold the items it writes
//! while the shard goes on changing.
//!
//! A value of [`OUTSIDE_VALUE_BYTES`] (1 KiB) or more gets its own allocation, and the
//! block holds a pointer to it after the key. Inline, such a value pushes header, key and
//! value together into the allocator's next size class, whose spacing is a quarter of the
//! size there (a 1 KiB value with its key and header lands in the 1,280-byte class); on its
//! own it costs its own size class, which is exact for the round sizes large values
//! usually have, and the block stays in a small class. Below 1 KiB the classes are close
//! enough that a second allocation would cost more than it saves.
//!
//! `touched` is when the item was last read or written, in [`TOUCH_TICK_MS`] ticks: what
//! approximate-LRU eviction compares (`limits.eviction`). Four bytes that were padding, so
//! it costs nothing; at 16 ms a tick it wraps after 2.2 years, and an item idle longer than
//! that merely looks younger than it is.
//!
//! Everything but the deadline and `touched` is immutable once built (a SET builds a new
//! item). Those two change only on the owning core (EXPIRE, reads); they are atomic so that
//! an item can be shared with other threads (a value in flight to another core) soundly.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;

#[repr(C)]
struct Header {
    refs: AtomicU32,
    key_len: u32,
    value_len: u32,
    /// Last read or write, in ticks of [`TOUCH_TICK_MS`] (wrapping).
    touched: AtomicU32,
    /// Absolute deadline in Unix ms; 0 = no expiry.
    expire_at_ms: AtomicU64,
}

const HEADER_BYTES: usize = std::mem::size_of::<Header>();
/// Values this long or longer live in their own allocation (see the module comment).
pub const OUTSIDE_VALUE_BYTES: usize = 1024;
const POINTER_BYTES: usize = std::mem::size_of::<*mut u8>();
/// The resolution of an item's last-access time: fine enough to order what a core touched
/// a moment ago against what it touched a second ago, coarse enough that 32 bits span
/// years.
pub const TOUCH_TICK_MS: u64 = 16;

/// `now_ms` in [`TOUCH_TICK_MS`] ticks, wrapping in 32 bits.
#[inline]
pub fn tick(now_ms: u64) -> u32 {
    (now_ms / TOUCH_TICK_MS) as u32
}

/// Whether a value of `value_len` bytes lives outside the block.
#[inline]
fn outside(value_len: usize) -> bool {
    value_len >= OUTSIDE_VALUE_BYTES
}

/// Bytes after the header: the key, then the value or the pointer to it.
#[inline]
fn payload(key_len: usize, value_len: usize) -> usize {
    key_len + if outside(value_len) { POINTER_BYTES } else { value_len }
}
/// More references than this means a leak somewhere; abort rather than overflow.
const REFS_MAX: u32 = u32::MAX / 2;

/// A key, its value and its deadline. Cloning counts a reference; the block goes when the
/// last one does.
pub struct Item(NonNull<Header>);

// SAFETY: the block is immutable after construction except for `refs` and `expire_at_ms`,
// which are atomics; the count follows `std::sync::Arc`'s protocol, so clones may live and
// drop on any thread.
unsafe impl Send for Item {}
// SAFETY: as above: `&Item` only reads immutable bytes or atomics.
unsafe impl Sync for Item {}

impl Item {
    /// Copies `key` and `value` into one new block, touched at tick `touched` ([`tick`]).
    pub fn new(key: &[u8], value: &[u8], expire_at_ms: u64, touched: u32) -> Item {
        let key_len = u32::try_from(key.len()).expect("keys are bounded by limits.key_bytes_max");
        let value_len = u32::try_from(value.len()).expect("values are bounded by limits.value_bytes_max");
        let layout = layout(payload(key.len(), value.len()));
        // SAFETY: the layouts have non-zero sizes (the header; an outside value has at
        // least OUTSIDE_VALUE_BYTES); each allocation is checked for null, then fully
        // written: the header, the key, then the value or the pointer to it (unaligned,
        // after a key of any length), from slices that cannot overlap blocks allocated now.
        unsafe {
            let block = alloc(layout).cast::<Header>();
            let Some(block) = NonNull::new(block) else {
                handle_alloc_error(layout)
            };
            block.as_ptr().write(Header {
                refs: AtomicU32::new(1),
                key_len,
                value_len,
                touched: AtomicU32::new(touched),
                expire_at_ms: AtomicU64::new(expire_at_ms),
            });
            let data = block.as_ptr().cast::<u8>().add(HEADER_BYTES);
            std::ptr::copy_nonoverlapping(key.as_ptr(), data, key.len());
            if outside(value.len()) {
                let value_layout = value_layout(value.len());
                let own = alloc(value_layout);
                if own.is_null() {
                    handle_alloc_error(value_layout)
                }
                std::ptr::copy_nonoverlapping(value.as_ptr(), own, value.len());
                data.add(key.len()).cast::<*mut u8>().write_unaligned(own);
            } else {
                std::ptr::copy_nonoverlapping(value.as_ptr(), data.add(key.len()), value.len());
            }
            Item(block)
        }
    }

    #[inline]
    fn header(&self) -> &Header {
        // SAFETY: the block lives while this reference does (we hold a count).
        unsafe { self.0.as_ref() }
    }

    #[inline]
    fn data(&self) -> *const u8 {
        // SAFETY: the key and value follow the header inside the same block.
        unsafe { self.0.as_ptr().cast::<u8>().add(HEADER_BYTES) }
    }

    #[inline]
    pub fn key(&self) -> &[u8] {
        // SAFETY: `key_len` initialised bytes follow the header, for the block's life.
        unsafe { std::slice::from_raw_parts(self.data(), self.header().key_len as usize) }
    }

    #[inline]
    pub fn value(&self) -> &[u8] {
        let h = self.header();
        let (key_len, value_len) = (h.key_len as usize, h.value_len as usize);
        // SAFETY: `value_len` initialised bytes follow the key, or live at the pointer that
        // follows it, for the block's life.
        unsafe {
            let at = self.data().add(key_len);
            let start = if outside(value_len) {
                at.cast::<*const u8>().read_unaligned()
            } else {
                at
            };
            std::slice::from_raw_parts(start, value_len)
        }
    }

    #[inline]
    pub fn expire_at_ms(&self) -> u64 {
        self.header().expire_at_ms.load(Ordering::Relaxed)
    }

    /// Moves the deadline (EXPIRE). Only the owning core calls it; readers elsewhere only
    /// read the key and value.
    #[inline]
    pub fn set_expire_at_ms(&self, expire_at_ms: u64) {
        self.header().expire_at_ms.store(expire_at_ms, Ordering::Relaxed);
    }

    /// Records a read or write at tick `now` ([`tick`]). Only the owning core calls it.
    #[inline]
    pub fn touch(&self, now: u32) {
        self.header().touched.store(now, Ordering::Relaxed);
    }

    /// The tick of the last read or write.
    #[inline]
    pub fn touched(&self) -> u32 {
        self.header().touched.load(Ordering::Relaxed)
    }

    /// Ticks since the last read or write, as of tick `now`.
    #[inline]
    pub fn idle_ticks(&self, now: u32) -> u32 {
        now.wrapping_sub(self.touched())
    }

    /// Whether the item has not expired at `now_ms`.
    #[inline]
    pub fn live(&self, now_ms: u64) -> bool {
        let e = self.expire_at_ms();
        e == 0 || e > now_ms
    }

    /// The value as `Bytes` that share this block: no copy, one count.
    pub fn value_bytes(&self) -> Bytes {
        Bytes::from_owner(ValueOf(self.clone()))
    }

    /// The block's size as the allocator sees it (what it costs in memory).
    pub fn heap_bytes(&self) -> u64 {
        let h = self.header();
        estimate(h.key_len as usize, h.value_len as usize)
    }

    /// Whether `self` and `other` are the same block (not merely equal bytes).
    #[inline]
    pub fn same(&self, other: &Item) -> bool {
        self.0 == other.0
    }

    /// The block's address: orders items in the deadline index, where two entries with the
    /// same deadline are told apart by their blocks.
    #[inline]
    pub fn address(&self) -> usize {
        self.0.as_ptr() as usize
    }
}

/// Asks the CPU to start loading `item`'s block (its header and key) into cache, and does
/// not wait for it.
#[inline]
pub fn prefetch(item: &Item) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and changes nothing but the cache.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(item.0.as_ptr().cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = item;
}

/// What an item of this key and value costs in the heap: jemalloc's size classes for its
/// block and, for a large value, the value's own allocation (the server's allocator, see
/// `crate::alloc`: jemalloc's small classes carry no per-block header, and huge blocks take
/// whole pages). Known before the item exists, so a write is checked against the memory
/// limit with the figure it will be accounted at.
pub fn estimate(key_len: usize, value_len: usize) -> u64 {
    let own = if outside(value_len) {
        allocation_bytes(value_len)
    } else {
        0
    };
    allocation_bytes(HEADER_BYTES + payload(key_len, value_len)) + own
}

/// What an allocation of `bytes` costs under the server's allocator (`crate::alloc`):
/// jemalloc's size class, or whole pages for a huge block.
pub fn allocation_bytes(bytes: usize) -> u64 {
    if bytes >= crate::alloc::HUGE_BYTES {
        return crate::alloc::huge_block_bytes(bytes);
    }
    // SAFETY: nallocx only computes a size class; callers never pass zero.
    unsafe { tikv_jemalloc_sys::nallocx(bytes, 0) as u64 }
}

fn value_layout(value_len: usize) -> Layout {
    Layout::from_size_align(value_len, 1).expect("value size fits a layout")
}

/// The layout of a block carrying `payload` bytes after its header.
fn layout(payload: usize) -> Layout {
    Layout::from_size_align(HEADER_BYTES + payload, std::mem::align_of::<Header>()).expect("item size fits a layout")
}

impl Clone for Item {
    fn clone(&self) -> Item {
        // Relaxed, as in `std::sync::Arc`: a new reference can only come from an existing one.
        if self.header().refs.fetch_add(1, Ordering::Relaxed) > REFS_MAX {
            std::process::abort();
        }
        Item(self.0)
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        if self.header().refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // As in `std::sync::Arc`: every other owner's use happens before the free.
        fence(Ordering::Acquire);
        let (key_len, value_len) = (self.header().key_len as usize, self.header().value_len as usize);
        // SAFETY: this was the last reference; the block (and an outside value) came from
        // `alloc` with these layouts, and nothing reads them after this.
        unsafe {
            if outside(value_len) {
                let own = self.data().add(key_len).cast::<*mut u8>().read_unaligned();
                dealloc(own, value_layout(value_len));
            }
            dealloc(self.0.as_ptr().cast(), layout(payload(key_len, value_len)));
        }
    }
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item")
            .field("key", &Bytes::copy_from_slice(self.key()))
            .field("value_len", &self.value().len())
            .field("expire_at_ms", &self.expire_at_ms())
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

    // Goal: an item gives back exactly the key, value and deadline it was built with
    // (empty ones too), shares its block with the Bytes a GET hands out (which outlive the
    // item), counts its references across threads, and reports what it costs.
    #[test]
    fn item_round_trip() {
        for (k, v) in [
            (&b""[..], &b""[..]),
            (b"k", b""),
            (b"", b"v"),
            (b"user_1_2", b"value_3"),
        ] {
            let item = Item::new(k, v, 7, 0);
            assert_eq!((item.key(), item.value(), item.expire_at_ms()), (k, v, 7));
        }
        let item = Item::new(b"key", &[7u8; 1000], 0, 0);
        let value = item.value_bytes();
        assert_eq!(&value[..], &[7u8; 1000][..]);
        assert_eq!(value.as_ptr(), item.value().as_ptr(), "no copy");
        item.set_expire_at_ms(5);
        assert!(item.live(4) && !item.live(5));
        drop(item);
        assert_eq!(value.len(), 1000, "the value outlives the item that made it");

        let shared = Item::new(b"k", b"v", 0, 0);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let mine = shared.clone();
                std::thread::spawn(move || (0..1000).map(|_| mine.clone()).filter(|c| c.key() == b"k").count())
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 1000);
        }
        assert_eq!(shared.header().refs.load(Ordering::Relaxed), 1);

        let small = Item::new(b"user_1_2", b"0123456789abcdef", 0, 0);
        assert_eq!(small.heap_bytes(), 48, "24 + 24 bytes: jemalloc's 48-byte class");
        assert_eq!(estimate(0, 1000), 1024, "24 + 1000 bytes inline: the 1024-byte class");
        assert_eq!(
            estimate(15, 1024),
            48 + 1024,
            "15 + 8 bytes after the header, the value on its own"
        );
        for len in [1023, 1024, 5000, 1 << 20] {
            let big = Item::new(b"a key", &vec![3u8; len], 0, 0);
            assert_eq!((big.key(), big.value()), (&b"a key"[..], &vec![3u8; len][..]), "{len}");
            assert_eq!(big.heap_bytes(), estimate(5, len));
            let value = big.value_bytes();
            drop(big);
            assert_eq!(value.len(), len);
        }
        small.touch(tick(1_000));
        assert_eq!(small.idle_ticks(tick(1_000 + 10 * TOUCH_TICK_MS)), 10);
        assert_eq!(small.idle_ticks(0), u32::MAX - tick(1_000) + 1, "ages wrap");
        assert!(small.same(&small.clone()) && !small.same(&Item::new(b"user_1_2", b"0123456789abcdef", 0, 0)));
    }
}
