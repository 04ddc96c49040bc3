//! The devices every machine that runs a virtlab image has: COM1, isa-debug-exit, the POST port,
//! the 8259 PIC pair and the 8254 PIT. Time is instruction time (see [`INSTRUCTIONS_PER_PIT_TICK`]).

use virtlab_machine_facts::MACHINE;

pub const COM1_BASE: u16 = MACHINE.serial_port;
pub const DEBUG_EXIT_PORT: u16 = MACHINE.debug_exit_port;
pub const POST_PORT: u16 = MACHINE.post_port;
const COM1_LAST: u16 = *MACHINE.serial_ports().end();
const PIC_MASTER_COMMAND: u16 = MACHINE.pic_master_ports.0;
const PIC_MASTER_DATA: u16 = MACHINE.pic_master_ports.1;
const PIC_SLAVE_COMMAND: u16 = MACHINE.pic_slave_ports.0;
const PIC_SLAVE_DATA: u16 = MACHINE.pic_slave_ports.1;
const PIT_CHANNEL0: u16 = MACHINE.pit_channel0_port;
const PIT_CHANNEL2: u16 = MACHINE.pit_channel0_port + 2;
const PIT_COMMAND: u16 = MACHINE.pit_command_port;

/// The model CPU runs at a nominal 1 GHz of retired instructions; the PIT's 1.193182 MHz input
/// clock then ticks once every 1e9 / 1.193182e6 = 838.1 instructions, rounded to 838.
pub const INSTRUCTIONS_PER_PIT_TICK: u64 = 838;

/// Serial output kept from one run. Every guest of the lab prints a few kilobytes; a guest that writes more is
/// flooding the port, and the machine stops it rather than hold its output without bound.
pub const MAX_SERIAL_BYTES: usize = 1 << 20;

/// 16550 UART reduced to what a polling guest driver sees: transmit always ready, output captured (up to
/// [`MAX_SERIAL_BYTES`]; bytes beyond it are dropped and [`Serial::flooded`] says so).
#[derive(Debug, Default, Clone)]
pub struct Serial {
    output: Vec<u8>,
    flooded: bool,
    interrupt_enable: u8,
    line_control: u8,
    modem_control: u8,
    scratch: u8,
    divisor: u16,
}

impl Serial {
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Whether the guest wrote more than [`MAX_SERIAL_BYTES`].
    pub fn flooded(&self) -> bool {
        self.flooded
    }

    fn divisor_latch(&self) -> bool {
        self.line_control & 0x80 != 0
    }

    fn read(&mut self, offset: u16) -> u8 {
        match offset {
            0 if self.divisor_latch() => self.divisor as u8,
            0 => 0,
            1 if self.divisor_latch() => (self.divisor >> 8) as u8,
            1 => self.interrupt_enable,
            // No interrupt pending; FIFOs reported as enabled like QEMU's 16550A.
            2 => 0xC1,
            3 => self.line_control,
            4 => self.modem_control,
            // Transmitter holding register and shift register empty.
            5 => 0x60,
            // Carrier detect, data set ready, clear to send: what QEMU reports with a backend attached.
            6 => 0xB0,
            _ => self.scratch,
        }
    }

    fn write(&mut self, offset: u16, value: u8) {
        match offset {
            0 if self.divisor_latch() => self.divisor = (self.divisor & 0xFF00) | value as u16,
            0 if self.output.len() < MAX_SERIAL_BYTES => self.output.push(value),
            0 => self.flooded = true,
            1 if self.divisor_latch() => self.divisor = (self.divisor & 0x00FF) | ((value as u16) << 8),
            1 => self.interrupt_enable = value & 0x0F,
            2 => {}
            3 => self.line_control = value,
            4 => self.modem_control = value & 0x1F,
            5 | 6 => {}
            _ => self.scratch = value,
        }
    }
}

/// One 8259A.
#[derive(Debug, Clone, Default)]
pub struct InterruptController {
    vector_base: u8,
    mask: u8,
    requests: u8,
    in_service: u8,
    /// Initialization words still expected after ICW1: (ICW2, ICW3, ICW4).
    init_step: u8,
    expects_icw3: bool,
    expects_icw4: bool,
    auto_eoi: bool,
    read_in_service: bool,
}

impl InterruptController {
    fn new(vector_base: u8) -> InterruptController {
        InterruptController { vector_base, mask: 0xFF, ..Default::default() }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1 restarts initialization and clears the mask and in-service state.
            self.init_step = 1;
            self.expects_icw3 = value & 0x02 == 0;
            self.expects_icw4 = value & 0x01 != 0;
            self.mask = 0;
            self.in_service = 0;
            self.requests = 0;
            self.auto_eoi = false;
            self.read_in_service = false;
        } else if value & 0x08 != 0 {
            if value & 0x02 != 0 {
                self.read_in_service = value & 0x01 != 0;
            }
        } else {
            match value >> 5 {
                // Non-specific EOI (and rotate on non-specific EOI, rotation not modelled).
                0b001 | 0b101 if self.in_service != 0 => self.in_service &= self.in_service - 1,
                // Specific EOI (and rotate on specific EOI).
                0b011 | 0b111 => self.in_service &= !(1 << (value & 7)),
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            1 => {
                self.vector_base = value & 0xF8;
                self.init_step = if self.expects_icw3 {
                    2
                } else if self.expects_icw4 {
                    3
                } else {
                    0
                };
            }
            2 => self.init_step = if self.expects_icw4 { 3 } else { 0 },
            3 => {
                self.auto_eoi = value & 0x02 != 0;
                self.init_step = 0;
            }
            _ => self.mask = value,
        }
    }

    fn read_command(&self) -> u8 {
        if self.read_in_service {
            self.in_service
        } else {
            self.requests
        }
    }

    /// Highest-priority unmasked request not blocked by an equal or higher one in service.
    fn pending(&self) -> Option<u8> {
        let candidates = self.requests & !self.mask;
        if candidates == 0 {
            return None;
        }
        let irq = candidates.trailing_zeros() as u8;
        let blocking = if self.in_service == 0 { 8 } else { self.in_service.trailing_zeros() as u8 };
        (irq < blocking).then_some(irq)
    }

    fn acknowledge(&mut self, irq: u8) -> u8 {
        self.requests &= !(1 << irq);
        if !self.auto_eoi {
            self.in_service |= 1 << irq;
        }
        self.vector_base + irq
    }
}

/// The master/slave 8259 pair, slave cascaded on master IRQ 2.
#[derive(Debug, Clone)]
pub struct Pic {
    pub master: InterruptController,
    pub slave: InterruptController,
}

impl Pic {
    fn new() -> Pic {
        Pic { master: InterruptController::new(0x08), slave: InterruptController::new(0x70) }
    }

    /// Edge on an IRQ line (0..=15).
    pub fn raise(&mut self, irq: u8) {
        if irq < 8 {
            self.master.requests |= 1 << irq;
        } else {
            self.slave.requests |= 1 << (irq - 8);
            self.master.requests |= 1 << 2;
        }
    }

    pub fn has_pending(&self) -> bool {
        self.master.pending().is_some()
    }

    /// INTA: the vector of the interrupt the CPU takes now, if any.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.master.pending()?;
        if irq == 2 {
            if let Some(slave_irq) = self.slave.pending() {
                self.master.acknowledge(2);
                return Some(self.slave.acknowledge(slave_irq));
            }
            // Spurious on the cascade line: the slave's request went away.
            self.master.requests &= !(1 << 2);
            return Some(self.slave.vector_base + 7);
        }
        Some(self.master.acknowledge(irq))
    }
}

/// 8254 channel 0 drives IRQ 0; channels 1 and 2 only keep what is written to them.
#[derive(Debug, Clone, Default)]
pub struct Pit {
    reload: [u16; 3],
    mode: [u8; 3],
    access: [u8; 3],
    write_low_next: [bool; 3],
    read_low_next: [bool; 3],
    latched: [Option<u16>; 3],
    /// Instruction time channel 0 was (re)loaded; None until programmed.
    channel0_start: Option<u64>,
    /// Next IRQ 0 edge, in instruction time.
    next_interrupt: Option<u64>,
}

impl Pit {
    fn period(&self) -> u64 {
        let count = if self.reload[0] == 0 { 0x10000 } else { self.reload[0] as u64 };
        count * INSTRUCTIONS_PER_PIT_TICK
    }

    fn periodic(&self) -> bool {
        matches!(self.mode[0] & 3, 2 | 3)
    }

    fn current_count(&self, channel: usize, now: u64) -> u16 {
        let count = if self.reload[channel] == 0 { 0x10000 } else { self.reload[channel] as u64 };
        match (channel, self.channel0_start) {
            (0, Some(start)) => {
                let ticks = (now - start) / INSTRUCTIONS_PER_PIT_TICK;
                if self.periodic() {
                    (count - ticks % count) as u16
                } else {
                    count.saturating_sub(ticks) as u16
                }
            }
            _ => self.reload[channel],
        }
    }

    fn write_command(&mut self, value: u8, now: u64) {
        let channel = (value >> 6) as usize;
        if channel == 3 {
            // Read-back command: latch counts of the selected channels.
            for ch in 0..3 {
                if value & (0x02 << ch) != 0 && value & 0x20 == 0 {
                    self.latched[ch] = Some(self.current_count(ch, now));
                }
            }
            return;
        }
        let access = (value >> 4) & 3;
        if access == 0 {
            self.latched[channel] = Some(self.current_count(channel, now));
            return;
        }
        self.access[channel] = access;
        self.mode[channel] = (value >> 1) & 7;
        self.write_low_next[channel] = true;
        self.read_low_next[channel] = true;
        if channel == 0 {
            self.channel0_start = None;
            self.next_interrupt = None;
        }
    }

    fn write_data(&mut self, channel: usize, value: u8, now: u64) {
        let complete = match self.access[channel] {
            1 => {
                self.reload[channel] = value as u16;
                true
            }
            2 => {
                self.reload[channel] = (value as u16) << 8;
                true
            }
            _ => {
                if self.write_low_next[channel] {
                    self.reload[channel] = (self.reload[channel] & 0xFF00) | value as u16;
                    self.write_low_next[channel] = false;
                    false
                } else {
                    self.reload[channel] = (self.reload[channel] & 0x00FF) | ((value as u16) << 8);
                    self.write_low_next[channel] = true;
                    true
                }
            }
        };
        if complete && channel == 0 {
            self.channel0_start = Some(now);
            self.next_interrupt = Some(now + self.period());
        }
    }

    fn read_data(&mut self, channel: usize, now: u64) -> u8 {
        let value = self.latched[channel].unwrap_or_else(|| self.current_count(channel, now));
        let (byte, done) = match self.access[channel] {
            1 => (value as u8, true),
            2 => ((value >> 8) as u8, true),
            _ => {
                if self.read_low_next[channel] {
                    self.read_low_next[channel] = false;
                    (value as u8, false)
                } else {
                    self.read_low_next[channel] = true;
                    ((value >> 8) as u8, true)
                }
            }
        };
        if done {
            self.latched[channel] = None;
        }
        byte
    }

    /// Raises IRQ 0 for a deadline that has passed; a periodic channel re-arms (missed periods of a
    /// long HLT merge into one edge, as the PIC's request latch would).
    fn advance(&mut self, now: u64, pic: &mut Pic) {
        if let Some(deadline) = self.next_interrupt {
            if now >= deadline {
                pic.raise(0);
                self.next_interrupt = if self.periodic() {
                    let period = self.period();
                    Some(deadline + ((now - deadline) / period + 1) * period)
                } else {
                    None
                };
            }
        }
    }
}

/// All port-mapped devices.
#[derive(Debug, Clone)]
pub struct Devices {
    pub serial: Serial,
    pub pic: Pic,
    pub pit: Pit,
    pub post_code: u8,
    /// Set by a write to isa-debug-exit.
    pub exit_request: Option<u32>,
}

impl Devices {
    pub fn new() -> Devices {
        Devices { serial: Serial::default(), pic: Pic::new(), pit: Pit::default(), post_code: 0, exit_request: None }
    }

    pub fn advance_time(&mut self, now: u64) {
        self.pit.advance(now, &mut self.pic);
    }

    /// Instruction time until the next device event (a PIT interrupt).
    pub fn time_until_next_event(&self, now: u64) -> Option<u64> {
        self.pit.next_interrupt.map(|deadline| deadline.saturating_sub(now))
    }

    pub fn next_event_time(&self) -> Option<u64> {
        self.pit.next_interrupt
    }

    /// IN of `bytes` (1, 2 or 4) from `port`. Ports with no device read as all ones, like QEMU.
    pub fn port_in(&mut self, port: u16, bytes: u32, now: u64) -> u32 {
        // Every modelled device is byte-wide; wider accesses are split as an ISA bus would.
        let mut value = 0u32;
        for i in 0..bytes {
            value |= u32::from(self.byte_in(port.wrapping_add(i as u16), now)) << (8 * i);
        }
        value
    }

    #[inline]
    fn byte_in(&mut self, port: u16, now: u64) -> u8 {
        match port {
            PIC_MASTER_COMMAND => self.pic.master.read_command(),
            PIC_MASTER_DATA => self.pic.master.mask,
            PIC_SLAVE_COMMAND => self.pic.slave.read_command(),
            PIC_SLAVE_DATA => self.pic.slave.mask,
            PIT_CHANNEL0..=PIT_CHANNEL2 => self.pit.read_data((port - PIT_CHANNEL0) as usize, now),
            COM1_BASE..=COM1_LAST => self.serial.read(port - COM1_BASE),
            DEBUG_EXIT_PORT => 0,
            _ => 0xFF,
        }
    }

    pub fn port_out(&mut self, port: u16, bytes: u32, value: u32, now: u64) {
        if port == DEBUG_EXIT_PORT {
            self.exit_request.get_or_insert(value & crate::alu::mask(bytes) as u32);
            return;
        }
        // Split into bytes as `port_in` does, in a loop: a recursive call per byte cost more than the devices.
        for i in 0..bytes {
            self.byte_out(port.wrapping_add(i as u16), (value >> (8 * i)) as u8, now);
        }
    }

    #[inline]
    fn byte_out(&mut self, port: u16, byte: u8, now: u64) {
        match port {
            DEBUG_EXIT_PORT => {
                self.exit_request.get_or_insert(u32::from(byte));
            }
            PIC_MASTER_COMMAND => self.pic.master.write_command(byte),
            PIC_MASTER_DATA => self.pic.master.write_data(byte),
            PIC_SLAVE_COMMAND => self.pic.slave.write_command(byte),
            PIC_SLAVE_DATA => self.pic.slave.write_data(byte),
            PIT_CHANNEL0..=PIT_CHANNEL2 => self.pit.write_data((port - PIT_CHANNEL0) as usize, byte, now),
            PIT_COMMAND => self.pit.write_command(byte, now),
            POST_PORT => self.post_code = byte,
            COM1_BASE..=COM1_LAST => self.serial.write(port - COM1_BASE, byte),
            _ => {}
        }
    }
}

impl Default for Devices {
    fn default() -> Devices {
        Devices::new()
    }
}
