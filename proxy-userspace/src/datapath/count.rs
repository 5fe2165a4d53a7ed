//! Counting the entries of a hash map in few syscalls.
//!
//! Walking keys with BPF_MAP_GET_NEXT_KEY costs one syscall per entry (about 0.75 s for a
//! full 262,144-entry conntrack map here); BPF_MAP_LOOKUP_BATCH (Linux 5.6) copies a few
//! thousand entries per call. aya has no batch call, so this issues it directly.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `BPF_MAP_LOOKUP_BATCH` of `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked per call.
const CHUNK: u32 = 4096;

/// The `batch` member of `union bpf_attr` (uapi/linux/bpf.h); the kernel zero-fills the
/// rest of the union.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries of the (non-per-CPU) hash or LRU hash map `fd` whose keys and values are
/// `key_size` and `value_size` bytes. Entries added or removed meanwhile may or may not be
/// counted, as with any walk of a live map.
pub fn hash_entries(fd: BorrowedFd<'_>, key_size: usize, value_size: usize) -> io::Result<u64> {
    let mut keys = vec![0u8; key_size * CHUNK as usize];
    let mut values = vec![0u8; value_size * CHUNK as usize];
    // The hash maps' batch position is a bucket index (u32); room for a u64.
    let mut in_batch = [0u8; 8];
    let mut out_batch = [0u8; 8];
    let mut total = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { in_batch.as_ptr() as u64 },
            out_batch: out_batch.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of CHUNK keys and values and at two 8-byte batch
        // positions, all alive across the call; the kernel writes no more than that.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let err = (r < 0).then(io::Error::last_os_error);
        match err {
            None => total += u64::from(attr.count),
            // The end: `count` holds the last entries.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(total + u64::from(attr.count));
            }
            Some(e) => return Err(e),
        }
        in_batch = out_batch;
        first = false;
    }
}
