//! `cloister-runtime`: the enclave runtime process. The supervisor starts it
//! with a clean environment and its private channel on standard input and
//! output; it is not meant to be run by hand.

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;

/// Every heap block is zeroed when freed, so that data keys and plaintext
/// records that passed through buffers this process does not control
/// (wasmtime's copies of import arguments and results, I/O buffers) do not
/// linger in freed memory after a call.
struct ZeroizingAlloc;

// SAFETY: forwards to the system allocator; `dealloc` only writes zeros over
// the block being freed, which the caller owns for `layout.size()` bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for ZeroizingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe {
            std::ptr::write_bytes(ptr, 0, layout.size());
            // Keep the compiler from treating the zeroing as a dead store.
            std::hint::black_box(ptr);
            System.dealloc(ptr, layout)
        }
    }
    // `realloc` is the trait's default: allocate, copy, then `dealloc` (zeroing)
    // the old block.
}

#[global_allocator]
static ALLOCATOR: ZeroizingAlloc = ZeroizingAlloc;

fn main() -> ExitCode {
    match cloister_runtime::serve::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloister-runtime: {e:#}");
            ExitCode::FAILURE
        }
    }
}
