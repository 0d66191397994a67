//! The process's memory policy, set once by the parts of peftdb that churn through large buffers (the
//! engine's tensors, ingestion's adapter files and encoded values), and the per-thread buffers that
//! such parts reuse from one item to the next (`with_reused_buffer`).
//!
//! On Linux with glibc, and unless the user set `GLIBC_TUNABLES`: freed memory stays in the heap for reuse
//! (`M_MMAP_THRESHOLD` 32 MiB, `M_TRIM_THRESHOLD` 1 GiB). By default glibc maps each large allocation
//! afresh and unmaps it when freed, so every tensor of a training step, and every adapter file and encoded
//! value of an ingestion, faulted its pages in again, and in a virtual machine that hands freed memory
//! back to its host, a fresh page costs a host fault too: 17% of a LoRA training step, and 2-3 s of
//! ingesting 10,000 MiniLM LoRAs (8.5-10.7 s against 10.9-13.1 s, interleaved). The price: the process
//! keeps up to its peak heap.

/// Keep freed memory in the heap for the rest of the process (see the module docs). Idempotent.
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            // SAFETY: mallopt only sets allocator parameters; a rejected value leaves the default.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    });
}

/// Run `f` with this thread's buffer in `key`, emptied. The buffer stays for the next call (its memory
/// stays mapped, where a fresh one per item cost the kernel's zeroing of new pages), unless `f` grew it
/// past `keep_up_to` bytes: then it is freed. A nested call on the same key gets a fresh buffer.
pub(crate) fn with_reused_buffer<R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<u8>>>,
    keep_up_to: usize,
    f: impl FnOnce(&mut Vec<u8>) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let r = f(&mut buf);
            if buf.capacity() > keep_up_to {
                *buf = Vec::new();
            }
            r
        }
        Err(_) => f(&mut Vec::new()),
    })
}
