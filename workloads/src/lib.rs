//! virtlab's workload catalog: a small 64-bit guest kernel (and a 32-bit one, `arch=x86-32`) and the classic
//! virtualization benchmarks, assembled in Rust with iced-x86 into Multiboot 1 images.
//!
//! ```
//! let image = virtlab_workloads::build("syscall", &[("iterations".into(), "10".into())]).unwrap();
//! assert_eq!(image.load_address, 0x10_0000);
//! ```

mod asm32;
mod catalog;
mod image;
mod kernel;
mod kernel32;
pub mod layout;
pub mod machine;
mod programs;
pub mod qemu;
mod symbols;
pub mod tour32;

pub use catalog::{catalog, Arch, ParamKind, ParamSpec, Privilege, WorkloadError, WorkloadSpec, ARCH};
pub use image::GuestImage;
pub use kernel::syscalls::{
    SYSCALL_COUNT, SYS_EXIT, SYS_FORK, SYS_GETPID, SYS_MMAP, SYS_MUNMAP, SYS_SET_TRAP_HANDLER, SYS_WAIT, SYS_WRITE,
    SYS_YIELD,
};
pub use machine::{exit_code, MachineFacts, MACHINE};
pub use symbols::Symbol;

/// Builds the named workload with `params` (name, value) given as text, defaults for the rest.
pub fn build(name: &str, params: &[(String, String)]) -> Result<GuestImage, WorkloadError> {
    let spec = catalog::find(name)?;
    let resolved = catalog::resolve(spec, params)?;
    let shown = resolved.shown(spec);
    let banner = banner(spec.name, &shown);
    let assembly_error = |error: iced_x86::IcedError| WorkloadError::Assembly {
        workload: spec.name.to_string(),
        message: error.to_string(),
    };
    let arch = resolved.arch();
    if arch == Arch::X86_64 && spec.param(catalog::SYSENTER.name).is_some_and(|_| resolved.get("sysenter") == 1) {
        return Err(WorkloadError::SysenterNeeds32Bit { workload: spec.name.to_string() });
    }
    let (first_page, kernel_bytes, symbols) = match arch {
        Arch::X86_64 => {
            let (first_page, mut symbols) = kernel::boot::first_page_after_header().map_err(assembly_error)?;
            let (kernel_bytes, kernel_symbols) =
                programs::assemble(spec, &resolved, &banner).map_err(assembly_error)?;
            symbols.extend(kernel_symbols);
            (first_page, kernel_bytes, symbols)
        }
        Arch::X86_32 => {
            let (kernel_bytes, symbols) = programs::assemble_32(spec, &resolved, &banner)?;
            (asm32::first_page().map_err(assembly_error)?, kernel_bytes, symbols)
        }
    };
    let image = GuestImage::new(spec.name, shown, arch, first_page, kernel_bytes, symbols);
    assert!(image.load_end() <= layout::IMAGE_LIMIT, "image overlaps the kernel's fixed data");
    Ok(image)
}

/// The first serial line every workload prints: `virtlab: <name> <param>=<value>...`.
pub fn banner<V: std::fmt::Display>(name: &str, params: &[(&str, V)]) -> String {
    let mut line = format!("virtlab: {name}");
    for (param, value) in params {
        line.push_str(&format!(" {param}={value}"));
    }
    line
}
