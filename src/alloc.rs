//! The server's allocator: jemalloc for everything but huge blocks, which the system
//! allocator (glibc) maps on their own.
//!
//! jemalloc keeps the store compact: its small size classes carry no per-block header and
//! it returns freed pages to the system within about a second (see `.cargo/config.toml`),
//! so resident memory follows what the node stores. But it grows a huge block by copying
//! it, and a connection's input buffer grows by doubling towards a frame of up to
//! `limits.frame_bytes_max` (16 MiB): four clients sending 16 MiB frames cost a PING on
//! another connection 13 to 16 ms at p99 that way. glibc maps blocks above its mmap
//! threshold on their own and grows them with `mremap`, which moves pages instead of bytes.
//! So blocks of [`HUGE_BYTES`] and more go to glibc, with its threshold pinned there.

use std::alloc::{GlobalAlloc, Layout, System};

use tikv_jemallocator::Jemalloc;

/// Blocks this large or larger come from the system allocator.
pub const HUGE_BYTES: usize = 1 << 20;

/// What a huge block costs: glibc maps it whole pages, with a 16-byte chunk header.
pub fn huge_block_bytes(size: usize) -> u64 {
    (size as u64 + 16).next_multiple_of(4096)
}

/// Pins glibc's mmap threshold at [`HUGE_BYTES`], so every block handed to it is mapped
/// on its own (and grown with `mremap`) rather than carved from its heap once the dynamic
/// threshold has risen. Call once at start, before other threads.
///
/// Also turns transparent huge pages off for the process, as Redis' `disable-thp` does.
/// Where the host sets them to `always`, a 2 MiB page is made resident whole as soon as
/// one byte of it is touched, so resident memory runs up to twice what the store holds
/// (measured: 31 MB resident for 15 MB of 16-byte items), `limits.memory_bytes_max` no
/// longer bounds the process, and khugepaged's compaction adds latency spikes.
pub fn init() {
    // SAFETY: mallopt only sets a glibc malloc parameter; prctl(PR_SET_THP_DISABLE) only
    // sets a flag on this process' address space.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HUGE_BYTES as libc::c_int);
        if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
            // Logging is not set up yet this early.
            eprintln!(
                "flux-server: cannot turn transparent huge pages off ({}): resident memory may exceed \
                 limits.memory_bytes_max",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// See the module comment.
pub struct ServerAllocator;

#[inline]
fn huge(size: usize) -> bool {
    size >= HUGE_BYTES
}

// SAFETY: every block is freed and grown by the allocator that made it, which is decided by
// its size alone, and the size is part of the layout every call receives; a block moving
// across the threshold is copied into a block from the other allocator.
unsafe impl GlobalAlloc for ServerAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if huge(layout.size()) {
            System.alloc(layout)
        } else {
            Jemalloc.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if huge(layout.size()) {
            System.alloc_zeroed(layout)
        } else {
            Jemalloc.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if huge(layout.size()) {
            System.dealloc(ptr, layout)
        } else {
            Jemalloc.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (huge(layout.size()), huge(new_size)) {
            (true, true) => System.realloc(ptr, layout, new_size),
            (false, false) => Jemalloc.realloc(ptr, layout, new_size),
            _ => {
                // SAFETY (caller's contract): `new_size`, rounded up to `layout.align()`,
                // does not overflow isize.
                let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}
