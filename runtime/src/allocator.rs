//! The host allocator's settings for tensor work on CPU backends.

/// Keeps freed tensor buffers in the process for reuse instead of handing them back to the
/// kernel.
///
/// glibc serves every allocation above 128 KiB with a fresh `mmap` and returns it with
/// `munmap` on free, so each large tensor of a CPU step costs zeroed pages and a page fault
/// per 4 KiB: about a tenth of the `tiny` training step (`transfusion-train bench`, measured
/// with and without). Raising the mapping threshold to glibc's maximum (32 MiB) and the
/// trim threshold keeps those buffers on the heap. Call once, first thing in `main`; a
/// no-op where the C library is not glibc.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}
