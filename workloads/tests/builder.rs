//! The image builder without running anything: parameter validation, reproducibility and the
//! Multiboot header.

use virtlab_workloads::{build, catalog, layout, Arch, Privilege, Symbol, WorkloadError};

fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

#[test]
fn unknown_workload_lists_every_name() {
    let error = build("nosuch", &[]).unwrap_err();
    let names: Vec<&str> = catalog().iter().map(|spec| spec.name).collect();
    assert_eq!(error.to_string(), format!("unknown workload `nosuch`; accepted: {}", names.join(", ")));
    assert!(error
        .to_string()
        .starts_with("unknown workload `nosuch`; accepted: syscall, in, cr8wr, callret, pgfault,"));
}

#[test]
fn unknown_parameter_lists_the_accepted_ones_with_ranges() {
    let error = build("memtouch", &params(&[("size", "3")])).unwrap_err();
    assert_eq!(
        error.to_string(),
        "workload `memtouch` has no parameter `size`; accepted: iterations (1..=10000, default 16), pages (1..=4096, default 256), counters (0..=1, default 0), arch (x86-64|x86-32, default x86-64)"
    );
}

#[test]
fn arch_is_a_choice_shown_only_when_not_the_default() {
    let default = build("in", &[]).unwrap();
    let explicit = build("in", &params(&[("arch", "x86-64")])).unwrap();
    assert_eq!(default, explicit, "arch=x86-64 is the default, byte for byte");
    assert_eq!(default.params, vec![("iterations", "2000".to_string())]);
    assert_eq!(default.arch, Arch::X86_64);

    let image = build("in", &params(&[("arch", "x86-32"), ("iterations", "3")])).unwrap();
    assert_eq!(image.arch, Arch::X86_32);
    assert_eq!(image.params, vec![("iterations", "3".to_string()), ("arch", "x86-32".to_string())]);
    let banner = b"virtlab: in iterations=3 arch=x86-32\n";
    assert!(image.bytes.windows(banner.len()).any(|w| w == banner), "the 32-bit image carries its banner");
    assert_ne!(image.bytes, build("in", &params(&[("iterations", "3")])).unwrap().bytes);

    let error = build("in", &params(&[("arch", "i386")])).unwrap_err();
    assert_eq!(
        error.to_string(),
        "parameter `arch` of workload `in`: `i386` is not one of the choices; accepted: x86-64|x86-32"
    );
}

#[test]
fn what_has_no_32_bit_build_says_so() {
    let arch = params(&[("arch", "x86-32")]);
    let error = build("cr8wr", &arch).unwrap_err();
    assert!(matches!(error, WorkloadError::Only64Bit { .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "workload `cr8wr` cannot have arch=x86-32: CR8 exists only in 64-bit mode (a 32-bit kernel sets the task \
         priority in the local APIC's TPR instead); use arch=x86-64"
    );
    let error = build("syscall", &params(&[("arch", "x86-32"), ("counters", "1")])).unwrap_err();
    assert!(matches!(error, WorkloadError::ParamNotBuiltFor32Bit { .. }), "{error}");
    let error = build("syscall", &params(&[("sysenter", "1")])).unwrap_err();
    assert_eq!(
        error.to_string(),
        "parameter `sysenter=1` of workload `syscall` needs arch=x86-32 (the 64-bit kernel is entered with SYSCALL)"
    );
    let built = catalog().iter().filter(|spec| build(spec.name, &arch).is_ok()).count();
    assert_eq!(built, catalog().len() - 2, "every workload but cr8wr and cr8rd builds for x86-32");
}

#[test]
fn x86_32_images_are_multiboot_images_that_jump_to_their_32_bit_kernel() {
    let arch = params(&[("arch", "x86-32")]);
    for spec in catalog() {
        let Ok(image) = build(spec.name, &arch) else { continue };
        assert_eq!(read_u32(&image.bytes, 0), 0x1BAD_B002, "{}", spec.name);
        assert_eq!(image.entry_point, layout::BOOT_STUB_ADDRESS, "{}", spec.name);
        // The Multiboot entry is a near JMP to the kernel at KERNEL_CODE_ADDRESS.
        let entry = (image.entry_point - image.load_address) as usize;
        assert_eq!(image.bytes[entry], 0xE9, "{}", spec.name);
        let target = image.entry_point as i64 + 5 + i64::from(read_u32(&image.bytes, entry + 1) as i32);
        assert_eq!(target as u64, layout::KERNEL_CODE_ADDRESS, "{}", spec.name);
        let names: Vec<&str> = image.symbols.iter().map(|s| s.name.as_str()).collect();
        for expected in ["kernel_entry", "driver", "kernel_init", "serial_write", "fault_common", "timer_handler"] {
            assert!(names.contains(&expected), "{}: {expected} missing from {names:?}", spec.name);
        }
        if spec.privilege == Privilege::User {
            let main = image.symbols.iter().find(|s| s.name == "main").expect("the program's main");
            assert_eq!(main.start, 0x4000_0000, "{}: process 1 starts at its main", spec.name);
            assert!(names.contains(&"syscall_int80") && names.contains(&"user_fault"), "{}: {names:?}", spec.name);
        }
        assert_eq!(image, build(spec.name, &arch).unwrap(), "{}: two builds differ", spec.name);
    }
}

#[test]
fn out_of_range_value_names_the_range() {
    let error = build("syscall", &params(&[("iterations", "0")])).unwrap_err();
    assert_eq!(
        error.to_string(),
        "parameter `iterations` of workload `syscall`: 0 is out of range; accepted: 1..=1000000"
    );
    let error = build("memtouch", &params(&[("pages", "4097")])).unwrap_err();
    assert_eq!(error.to_string(), "parameter `pages` of workload `memtouch`: 4097 is out of range; accepted: 1..=4096");
}

#[test]
fn non_numeric_value_names_the_range() {
    let error = build("hlt", &params(&[("iterations", "ten")])).unwrap_err();
    assert_eq!(
        error,
        WorkloadError::NotANumber {
            workload: "hlt".into(),
            param: "iterations".into(),
            value: "ten".into(),
            min: 1,
            max: 10_000
        }
    );
    assert_eq!(
        error.to_string(),
        "parameter `iterations` of workload `hlt`: `ten` is not an unsigned integer; accepted: 1..=10000"
    );
}

#[test]
fn repeated_parameter_is_refused() {
    let error = build("syscall", &params(&[("iterations", "5"), ("iterations", "6")])).unwrap_err();
    assert_eq!(error.to_string(), "parameter `iterations` of workload `syscall` is given more than once");
}

#[test]
fn catalog_entries_are_well_formed() {
    let mut names: Vec<&str> = catalog().iter().map(|spec| spec.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), catalog().len(), "names are unique");
    for spec in catalog() {
        assert!(spec.param("iterations").is_some(), "{} takes iterations", spec.name);
        assert!(!spec.description.is_empty() && !spec.description.contains('\n'));
        for param in spec.params {
            assert!(param.min <= param.default && param.default <= param.max, "{}.{}", spec.name, param.name);
        }
    }
}

#[test]
fn two_builds_are_byte_identical() {
    for spec in catalog() {
        let first = build(spec.name, &[]).unwrap();
        let second = build(spec.name, &[]).unwrap();
        assert_eq!(first, second, "{}", spec.name);
    }
}

#[test]
fn parameters_change_the_image() {
    let small = build("compute", &params(&[("iterations", "10")])).unwrap();
    let large = build("compute", &params(&[("iterations", "11")])).unwrap();
    assert_ne!(small.bytes, large.bytes);
    assert_eq!(small.params, vec![("iterations", "10".to_string()), ("counters", "0".to_string())]);
}

#[test]
fn multiboot_header_is_consistent() {
    for spec in catalog() {
        let image = build(spec.name, &[]).unwrap();
        let bytes = &image.bytes;
        let magic = read_u32(bytes, 0);
        let flags = read_u32(bytes, 4);
        let checksum = read_u32(bytes, 8);
        assert_eq!(magic, 0x1BAD_B002);
        assert_eq!(flags, 1 << 16, "a.out kludge only");
        assert_eq!(magic.wrapping_add(flags).wrapping_add(checksum), 0);
        assert_eq!(read_u32(bytes, 12) as u64, image.load_address, "header_addr: header at file offset 0");
        assert_eq!(read_u32(bytes, 16) as u64, image.load_address, "load_addr");
        assert_eq!(read_u32(bytes, 20) as u64, image.load_end(), "load_end_addr");
        assert_eq!(read_u32(bytes, 24) as u64, image.bss_end, "bss_end_addr");
        assert_eq!(read_u32(bytes, 28) as u64, image.entry_point, "entry_addr");
        assert_eq!(image.load_address, 0x10_0000);
        assert!(image.load_end() <= layout::IMAGE_LIMIT);
        assert!(image.bss_end > image.load_end());
        let entry_offset = (image.entry_point - image.load_address) as usize;
        let first = iced_x86::Decoder::with_ip(32, &bytes[entry_offset..], image.entry_point, 0).decode();
        assert_eq!(first.mnemonic(), iced_x86::Mnemonic::Cli, "{}: the stub starts with CLI", spec.name);
    }
}

#[test]
fn describe_summarises_the_image() {
    let image = build("memtouch", &params(&[("pages", "8")])).unwrap();
    let text = image.describe();
    assert!(text.starts_with("workload:     memtouch iterations=16 pages=8 counters=0\n"), "{text}");
    assert!(text.contains("entry:        0x100070 (32-bit protected mode)"), "{text}");
    assert!(text.contains(&format!("size:         {} bytes", image.bytes.len())), "{text}");
}

#[test]
fn kernel_code_never_uses_32_bit_iret_or_rdtscp() {
    for spec in catalog() {
        let image = build(spec.name, &[]).unwrap();
        let start = (layout::KERNEL_CODE_ADDRESS - image.load_address) as usize;
        let mut decoder = iced_x86::Decoder::with_ip(64, &image.bytes[start..], layout::KERNEL_CODE_ADDRESS, 0);
        for instruction in &mut decoder {
            assert_ne!(instruction.code(), iced_x86::Code::Iretd, "{}", spec.name);
            assert_ne!(instruction.mnemonic(), iced_x86::Mnemonic::Rdtscp, "{}", spec.name);
        }
    }
}

#[test]
fn catalog_holds_the_issue_4_and_issue_9_workloads() {
    let names: Vec<&str> = catalog().iter().map(|spec| spec.name).collect();
    assert_eq!(
        names,
        [
            "syscall",
            "in",
            "cr8wr",
            "callret",
            "pgfault",
            "divzero",
            "ptemod",
            "cpuid",
            "cr8rd",
            "rdmsr",
            "wrmsr",
            "inl",
            "outl",
            "hlt",
            "mmio",
            "sensitive-kernel",
            "redpill",
            "forkwait",
            "ctxswitch",
            "mmap",
            "demandzero",
            "cow",
            "compute",
            "memtouch",
            "syscall-mix",
            "boot"
        ]
    );
}

/// The kernel's instructions of one symbol, decoded from the image.
fn instructions_of(image: &virtlab_workloads::GuestImage, symbol: &Symbol) -> Vec<iced_x86::Instruction> {
    let offset = (symbol.start - image.load_address) as usize;
    let bytes = &image.bytes[offset..offset + (symbol.end - symbol.start) as usize];
    let bitness = if symbol.start < layout::KERNEL_CODE_ADDRESS { 32 } else { 64 };
    iced_x86::Decoder::with_ip(bitness, bytes, symbol.start, 0).into_iter().collect()
}

#[test]
fn every_image_names_its_functions_from_the_assembler_labels() {
    for spec in catalog() {
        let image = build(spec.name, &[]).unwrap();
        let symbols = &image.symbols;
        for pair in symbols.windows(2) {
            assert!(pair[0].end <= pair[1].start, "{}: {:?} overlaps {:?}", spec.name, pair[0], pair[1]);
        }
        let named = |name: &str| symbols.iter().find(|s| s.name == name);
        for name in [
            "kernel_entry",
            "driver",
            "kernel_init",
            "syscall_entry",
            "sys_getpid",
            "page_fault_handler",
            "exception_stub_13",
        ] {
            assert!(named(name).is_some(), "{}: no symbol {name}", spec.name);
        }
        assert_eq!(named("kernel_entry").unwrap().start, layout::KERNEL_CODE_ADDRESS, "{}", spec.name);
        assert_eq!(named("boot_stub").unwrap().start, layout::BOOT_STUB_ADDRESS, "{}", spec.name);
        let (kernel, user): (Vec<&Symbol>, Vec<&Symbol>) = symbols.iter().partition(|s| s.start < layout::USER_BASE);
        for symbol in &kernel {
            assert!(symbol.start < symbol.end && symbol.end <= image.load_end(), "{}: {symbol:?}", spec.name);
            // Each function decodes to whole instructions: its end is where the next one starts.
            let decoded = instructions_of(&image, symbol);
            assert!(decoded.iter().all(|i| !i.is_invalid()), "{}: {} does not decode", spec.name, symbol.name);
            assert_eq!(decoded.last().unwrap().next_ip(), symbol.end, "{}: {}", spec.name, symbol.name);
        }
        match spec.privilege {
            Privilege::User => {
                assert_eq!(user[0].name, "main", "{}", spec.name);
                assert_eq!(user[0].start, layout::USER_CODE, "{}", spec.name);
            }
            Privilege::Kernel => assert!(user.is_empty(), "{}: {user:?}", spec.name),
        }
    }
    let pgfault = build("pgfault", &[]).unwrap();
    assert!(pgfault.symbols.iter().any(|s| s.name == "trap_handler" && s.start > layout::USER_CODE));
}

#[test]
fn the_driver_symbol_holds_the_measured_instruction() {
    let image = build("cpuid", &params(&[("iterations", "3")])).unwrap();
    let kernel: Vec<&Symbol> = image.symbols.iter().filter(|s| s.start < layout::USER_BASE).collect();
    let mut cpuid_in = Vec::new();
    for symbol in kernel {
        let count =
            instructions_of(&image, symbol).iter().filter(|i| i.mnemonic() == iced_x86::Mnemonic::Cpuid).count();
        if count > 0 {
            cpuid_in.push((symbol.name.as_str(), count));
        }
    }
    // One CPUID before the loop (the vendor to compare with) and one in it.
    assert_eq!(cpuid_in, [("driver", 2)]);
}
