//! Guest RAM: an anonymous private mapping handed to KVM by address.

use crate::KvmError;

pub struct GuestRam {
    address: *mut u8,
    len: usize,
}

impl GuestRam {
    pub fn new(len: usize) -> Result<GuestRam, KvmError> {
        // SAFETY: an anonymous private mapping with no address hint touches no existing memory; the result is
        // checked against MAP_FAILED before use.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(KvmError::Memory { bytes: len as u64, source: std::io::Error::last_os_error() });
        }
        Ok(GuestRam { address: address.cast(), len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn host_address(&self) -> u64 {
        self.address as u64
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `address` is a live read-write mapping of `len` bytes owned by `self`, and `&mut self` makes
        // this the only Rust reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.address, self.len) }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the VM that used it has been dropped before us.
        unsafe {
            libc::munmap(self.address.cast(), self.len);
        }
    }
}
