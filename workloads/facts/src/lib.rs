//! Facts about the machine every guest image relies on, as data: the workload images are built for them, and the
//! reference machine, the KVM runner, QEMU's command line and the engines take them from here rather than
//! re-typing them. No dependencies: every crate of the lab can afford this one.

/// The devices, addresses and timer programming a guest image expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineFacts {
    /// Guest RAM the kernel expects, starting at guest-physical 0.
    pub ram_bytes: u64,
    /// Guest-physical address the Multiboot image is loaded at.
    pub load_address: u64,
    /// COM1 base port; the kernel writes bytes to the transmit holding register only.
    pub serial_port: u16,
    /// QEMU `isa-debug-exit` port: an OUT of v ends the machine with status (v << 1) | 1.
    pub debug_exit_port: u16,
    /// POST diagnostic port, read by the `in` nanobenchmark; writes are ignored.
    pub post_port: u16,
    /// What a byte read of the POST port returns (QEMU's value; the `in` self-check relies on it).
    pub post_port_read_value: u8,
    /// A port with no device behind it, used by the `inl` and `outl` workloads: writes go nowhere.
    pub unassigned_test_port: u16,
    /// What a 32-bit read of the unassigned port returns: all ones, as under QEMU.
    pub unassigned_port_read_value: u32,
    /// 8259 PIC command/data ports, master then slave.
    pub pic_master_ports: (u16, u16),
    pub pic_slave_ports: (u16, u16),
    /// Interrupt vector of IRQ 0 after the kernel remaps the PICs; IRQ n arrives at base + n.
    pub pic_vector_base: u8,
    /// 8254 PIT channel 0 data port and mode/command port.
    pub pit_channel0_port: u16,
    pub pit_command_port: u16,
    /// Byte written to the PIT command port: channel 0, low then high byte, mode 2, binary.
    pub pit_mode: u8,
    /// Channel 0 reload value (1,193,182 Hz / 1193 ≈ 1 kHz timer interrupts).
    pub pit_divisor: u16,
    /// Only IRQ 0 (the PIT) is unmasked; these are the PIC interrupt masks written at start-up.
    pub pic_masks: (u8, u8),
    /// The MMIO test region: no device; reads return 0 and writes are dropped, as under QEMU.
    pub mmio_test_base: u64,
    pub mmio_test_size: u64,
}

impl MachineFacts {
    /// COM1's eight registers, from the base port.
    pub const fn serial_ports(&self) -> std::ops::RangeInclusive<u16> {
        self.serial_port..=self.serial_port + 7
    }

    /// The MMIO test region's guest-physical addresses.
    pub const fn mmio_test_region(&self) -> std::ops::Range<u64> {
        self.mmio_test_base..self.mmio_test_base + self.mmio_test_size
    }
}

/// The one machine description every workload image is built for.
pub const MACHINE: MachineFacts = MachineFacts {
    ram_bytes: 128 << 20,
    load_address: 0x10_0000,
    serial_port: 0x3F8,
    debug_exit_port: 0xF4,
    post_port: 0x80,
    post_port_read_value: 0xFF,
    unassigned_test_port: 0x1234,
    unassigned_port_read_value: 0xFFFF_FFFF,
    pic_master_ports: (0x20, 0x21),
    pic_slave_ports: (0xA0, 0xA1),
    pic_vector_base: 0x20,
    pit_channel0_port: 0x40,
    pit_command_port: 0x43,
    pit_mode: 0x34,
    pit_divisor: 1193,
    pic_masks: (0xFE, 0xFF),
    mmio_test_base: 0xD000_0000,
    mmio_test_size: 0x1000,
};

/// Values the guest writes to the debug-exit port, one per way a run can end.
pub mod exit_code {
    /// The workload's self-check passed.
    pub const SUCCESS: u32 = 0;
    /// The workload's self-check failed (or its first process exited with a non-zero status).
    pub const CHECK_FAILED: u32 = 1;
    /// An exception the kernel does not handle happened in kernel mode.
    pub const KERNEL_PANIC: u32 = 2;
    /// The kernel ran out of physical page frames.
    pub const OUT_OF_MEMORY: u32 = 3;
    /// No process could run and none could ever become runnable.
    pub const DEADLOCK: u32 = 4;
}
