//! What the report says: the sections, their tables and the charts, from an indexed results table and the
//! validation's JSON. Families the report does not know by name are shown too, under "Other measurements".

use serde_json::Value;

use crate::chart::{self, BarChart, Layout, Series};
use crate::document::{Block, Document, Image, Section, Table};
use crate::flatten::TOTALS;
use crate::index::Index;

/// The families (as `virtlab replay --json` names them) that have their own chart or section.
const CYCLES: (&str, &str) = (TOTALS, "cycles");
const INSTRUCTIONS: (&str, &str) = (TOTALS, "instructions");
const CAUSES: &str = "cycles_by_cause";
const EXITS: &str = "exits";
const TRANSLATIONS: &str = "translations";
const HYPERCALLS: &str = "hypercalls";
const SHADOW: &str = "shadow";
/// Where each engine ran the guest kernel and what its self-protection did (`Metrics::protection`).
const PROTECTION: &str = "protection";
const SHOWN_ELSEWHERE: [&str; 6] = [TOTALS, CAUSES, EXITS, TRANSLATIONS, HYPERCALLS, SHADOW];

/// A trace's parameters (`k=v,k=v`) without `arch`, to pair the two widths of one workload.
fn strip_arch(parameters: &str) -> String {
    parameters.split(',').filter(|p| !p.starts_with("arch=")).collect::<Vec<_>>().join(",")
}
const NATIVE: &str = "native";
/// Sites listed per engine and workload.
const TOP_SITES: usize = 5;

/// What each engine models, for readers who meet the names here first.
const ENGINES: [(&str, &str); 7] = [
    ("native", "the bare machine: the reference every ratio is taken against"),
    ("trap-emulate", "Popek & Goldberg's trap-and-emulate monitor: the deprivileged kernel traps on privileged instructions; shadow page tables"),
    ("hybrid", "Popek & Goldberg's hybrid monitor: kernel mode interpreted, user mode direct (also what KVM's PVM backend does)"),
    ("bt", "VMware-style binary translation of kernel code through a translation cache, callouts for privileged work"),
    ("paravirt", "Xen-style paravirtualization: privileged operations become hypercalls, page-table writes batched"),
    ("hw-ept", "VT-x/AMD-V with nested paging (EPT/NPT)"),
    ("hw-shadow", "first-generation VT-x: hardware exits with shadow paging"),
];

/// A chart to draw and where the page expects it.
pub struct ChartFile {
    pub file: String,
    pub chart: BarChart,
}

pub struct Report {
    pub document: Document,
    pub charts: Vec<ChartFile>,
}

/// `1,234,567`; fractions keep up to two digits.
pub fn count(value: f64) -> String {
    if value.fract() != 0.0 {
        return format!("{value:.2}");
    }
    let digits = format!("{}", value.abs() as u64);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

/// `12.3×`, three significant digits at most.
pub fn ratio(value: f64) -> String {
    match value {
        v if v >= 100.0 => format!("{v:.0}×"),
        v if v >= 10.0 => format!("{v:.1}×"),
        v => format!("{v:.2}×"),
    }
}

pub fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

fn section(id: &str, title: impl Into<String>, level: u8, blocks: Vec<Block>) -> Section {
    Section { id: id.to_string(), title: title.into(), level, blocks }
}

fn paragraph(text: impl Into<String>) -> Block {
    Block::Paragraph(text.into())
}

struct Builder<'a, 'r> {
    index: &'a Index<'r>,
    charts: Vec<ChartFile>,
}

/// Builds the report. `validation` is the JSON `virtlab validate --json` printed, if the results directory has it.
pub fn build(index: &Index<'_>, validation: Option<&Value>, timestamp: String) -> Report {
    let mut builder = Builder { index, charts: Vec::new() };
    let mut sections = vec![builder.about(), builder.cheapest(), builder.relative_table()];
    sections.extend(builder.workloads());
    sections.push(builder.per_workload_family(
        "bt",
        "Binary translation",
        TRANSLATIONS,
        "bt",
        "What the translator did on each workload (`bt`): blocks and instructions translated, IDENT and non-IDENT \
         instructions, translation-cache bytes, chained links, indirect-branch lookups, callouts to the monitor, \
         emulations inside the translation cache, and retranslations by adaptive binary translation.",
    ));
    sections.push(builder.per_workload_family(
        "paravirt",
        "Paravirtual hypercalls",
        HYPERCALLS,
        "paravirt",
        "The hypercalls the paravirtualized kernel makes, by kind (Xen's names), on each workload (`paravirt`).",
    ));
    sections.push(builder.shadow());
    sections.push(builder.story());
    sections.push(builder.other_families());
    sections.push(validation_section(validation));
    Report { document: Document { title: "virtlab report".into(), timestamp, sections }, charts: builder.charts }
}

impl Builder<'_, '_> {
    fn first_profile(&self) -> &str {
        self.index.profiles.first().map_or("", String::as_str)
    }

    fn engine_index(&self, name: &str) -> Option<usize> {
        self.index.engines.iter().position(|e| e == name)
    }

    /// Cycles of `engine` over native's on the same trace and profile.
    fn relative(&self, t: usize, p: usize, e: usize) -> Option<f64> {
        let native = self.engine_index(NATIVE)?;
        let base = self.index.value(t, p, native, CYCLES.0, CYCLES.1).filter(|v| *v > 0.0)?;
        Some(self.index.value(t, p, e, CYCLES.0, CYCLES.1)? / base)
    }

    fn about(&self) -> Section {
        let index = self.index;
        let m = &index.results.manifest;
        let mut blocks = vec![paragraph(format!(
            "{} traces × {} engines × {} profiles, swept by {}. Engines: {}. Profiles: {}. Options: {}.",
            index.traces.len(),
            index.engines.len(),
            index.profiles.len(),
            m.written_by,
            index.engines.join(", "),
            index.profiles.join(", "),
            if m.options.is_empty() { "none" } else { m.options.as_str() },
        ))];
        if m.options.split(',').any(|o| o.trim() == "bt.lmsle=true") {
            blocks.push(paragraph(
                "`bt` ran with `bt.lmsle=true`: the host is taken to have long-mode segment limits. Without them \
                 binary translation cannot protect its monitor from a 64-bit guest, and `bt` refuses such traces \
                 (as VMware's did); with them it translates like VMware's 64-bit BT on later AMD processors.",
            ));
        }
        blocks.push(paragraph(
            "Cycles are what each engine's mechanism costs with the profile's primitive costs (the profile names \
             each primitive's source); ratios are against `native` on the same trace and profile. Exits and \
             traps carry KVM's reason names; sites are the guest instructions the monitor was entered from.",
        ));
        let mut engines = Table::new("Engines", vec!["engine".into(), "strategy".into()]);
        for name in &index.engines {
            let what = ENGINES.iter().find(|(n, _)| n == name).map_or("", |(_, what)| what);
            engines.rows.push(vec![name.clone(), what.to_string()]);
        }
        blocks.push(Block::Table(engines));
        let mut refusals =
            Table::new("Refusals", vec!["workload".into(), "engine".into(), "profiles".into(), "reason".into()]);
        for (t, trace) in index.traces.iter().enumerate() {
            for (e, engine) in index.engines.iter().enumerate() {
                let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
                for (p, profile) in index.profiles.iter().enumerate() {
                    let Some(reason) = index.job(t, p, e).and_then(|j| j.refusal) else { continue };
                    match reasons.iter_mut().find(|(r, _)| *r == reason) {
                        Some((_, profiles)) => profiles.push(profile),
                        None => reasons.push((reason, vec![profile])),
                    }
                }
                for (reason, profiles) in reasons {
                    refusals.rows.push(vec![
                        trace.label.clone(),
                        engine.clone(),
                        profiles.join(", "),
                        reason.to_string(),
                    ]);
                }
            }
        }
        if refusals.rows.is_empty() {
            blocks.push(paragraph("Every engine ran on every trace."));
        } else {
            blocks.push(Block::Table(refusals));
        }
        section("sweep", "The sweep", 2, blocks)
    }

    fn cheapest(&self) -> Section {
        let index = self.index;
        let mut header = vec!["workload".to_string()];
        for profile in &index.profiles {
            header.push(format!("cheapest, {profile}"));
            header.push(format!("dearest, {profile}"));
        }
        let mut table = Table::new("", header);
        for (t, trace) in index.traces.iter().enumerate() {
            let mut row = vec![trace.label.clone()];
            for p in 0..index.profiles.len() {
                let mut ranked: Vec<(f64, &str)> = (0..index.engines.len())
                    .filter(|&e| index.engines[e] != NATIVE)
                    .filter_map(|e| Some((self.relative(t, p, e)?, index.engines[e].as_str())))
                    .collect();
                ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
                let cell = |entry: Option<&(f64, &str)>| {
                    entry.map_or("—".to_string(), |(r, e)| format!("{e} ({})", ratio(*r)))
                };
                row.push(cell(ranked.first()));
                row.push(cell(ranked.last()));
            }
            table.rows.push(row);
        }
        let blocks = vec![
            paragraph(
                "For each workload and profile, the virtualization strategy with the fewest cycles and the one with \
                 the most, as a multiple of native. Engines that refused a trace are left out.",
            ),
            Block::Table(table),
        ];
        section("cheapest", "Cheapest strategy per workload", 2, blocks)
    }

    fn relative_table(&self) -> Section {
        let index = self.index;
        let mut blocks = vec![paragraph(
            "Cycles of each engine as a multiple of native cycles on the same trace, one table per profile.",
        )];
        for (p, profile) in index.profiles.iter().enumerate() {
            let mut header = vec!["workload".to_string()];
            header.extend(index.engines.iter().cloned());
            let mut table = Table::new(format!("Profile {profile}"), header);
            for (t, trace) in index.traces.iter().enumerate() {
                let mut row = vec![trace.label.clone()];
                for e in 0..index.engines.len() {
                    let refused = index.job(t, p, e).and_then(|j| j.refusal).is_some();
                    row.push(match self.relative(t, p, e) {
                        Some(r) => ratio(r),
                        None if refused => "refused".into(),
                        None => "—".into(),
                    });
                }
                table.rows.push(row);
            }
            blocks.push(Block::Table(table));
        }
        section("relative", "Cycles relative to native", 2, blocks)
    }

    fn workloads(&mut self) -> Vec<Section> {
        let mut sections = vec![section(
            "workloads",
            "Workloads",
            2,
            vec![paragraph(
                "Per workload: cycles relative to native by engine and profile, exits by reason, cycles by cause for \
                 each profile, the numbers behind them, and the guest instructions that entered the monitor most.",
            )],
        )];
        for t in 0..self.index.traces.len() {
            sections.push(self.workload(t));
        }
        sections
    }

    fn image(&mut self, file: String, alt: String, chart: BarChart) -> Image {
        let image = Image { file: file.clone(), alt, width: chart::WIDTH, height: chart.height() };
        self.charts.push(ChartFile { file, chart });
        image
    }

    fn workload(&mut self, t: usize) -> Section {
        let index = self.index;
        let trace = &index.traces[t];
        let stem = format!("charts/{:02}-{}", t + 1, slug(&trace.label));
        let engines = &index.engines;
        let refused = |p: usize, e: usize| index.job(t, p, e).and_then(|j| j.refusal).is_some();
        let notes =
            |p: usize| (0..engines.len()).filter(|&e| refused(p, e)).map(|e| (e, "refused".to_string())).collect();
        let instructions = (0..engines.len()).find_map(|e| index.value(t, 0, e, INSTRUCTIONS.0, INSTRUCTIONS.1));
        let mut blocks = vec![paragraph(format!(
            "Trace `{}`: workload `{}`{}, {}{}.",
            trace.trace,
            trace.workload,
            if trace.parameters.is_empty() { String::new() } else { format!(" with {}", trace.parameters) },
            trace.architecture,
            instructions.map_or(String::new(), |n| format!(", {} guest instructions", count(n))),
        ))];

        let relative = BarChart {
            title: format!("{}: cycles relative to native", trace.label),
            x_label: "engine".into(),
            y_label: "cycles ÷ native cycles".into(),
            categories: engines.clone(),
            series: (0..index.profiles.len())
                .map(|p| Series {
                    name: index.profiles[p].clone(),
                    values: (0..engines.len()).map(|e| self.relative(t, p, e)).collect(),
                })
                .collect(),
            layout: Layout::Grouped,
            reference: Some((1.0, "native (= 1)".into())),
            notes: notes(0),
        };
        let mut images = vec![self.image(
            format!("{stem}-relative.png"),
            format!("{}: cycles relative to native, by engine and profile", trace.label),
            relative,
        )];
        let first: Vec<(usize, usize, usize)> = (0..engines.len()).map(|e| (t, 0, e)).collect();
        let exits = Stacked {
            family: EXITS,
            what: "exits by reason",
            unit: "exits and traps",
            file: format!("{stem}-exits.png"),
        };
        images.push(self.stacked(t, 0, exits, &first));
        blocks.push(Block::Images(images));
        let mut causes = Vec::new();
        for (p, profile) in index.profiles.iter().enumerate() {
            let jobs: Vec<(usize, usize, usize)> = (0..engines.len()).map(|e| (t, p, e)).collect();
            let title = format!("cycles by cause, {profile}");
            let spec = Stacked {
                family: CAUSES,
                what: &title,
                unit: "cycles",
                file: format!("{stem}-cycles-{}.png", slug(profile)),
            };
            causes.push(self.stacked(t, p, spec, &jobs));
        }
        blocks.push(Block::Images(causes));
        blocks.push(Block::Table(self.cycles_table(t)));
        blocks.push(Block::Table(self.family_table(
            format!("Totals ({})", self.first_profile()),
            TOTALS,
            &first,
            |_, e| engines[e].clone(),
            "engine",
        )));
        blocks.push(Block::Details(
            format!("Top sites: the guest instructions that entered the monitor most ({})", self.first_profile()),
            self.sites(t),
        ));
        section(&format!("w-{}", slug(&trace.label)), trace.label.clone(), 3, blocks)
    }

    /// A stacked chart of one family's non-zero keys per engine.
    fn stacked(&mut self, t: usize, p: usize, spec: Stacked, jobs: &[(usize, usize, usize)]) -> Image {
        let Stacked { family, what, unit, file } = spec;
        let index = self.index;
        let keys = index.nonzero_keys(family, jobs);
        let chart = BarChart {
            title: format!("{}: {what}", index.traces[t].label),
            x_label: "engine".into(),
            y_label: unit.into(),
            categories: index.engines.clone(),
            series: keys
                .iter()
                .map(|key| Series {
                    name: key.clone(),
                    values: (0..index.engines.len()).map(|e| index.value(t, p, e, family, key)).collect(),
                })
                .collect(),
            layout: Layout::Stacked,
            reference: None,
            notes: (0..index.engines.len())
                .filter_map(|e| {
                    let job = index.job(t, p, e);
                    match job.and_then(|j| j.refusal) {
                        Some(_) => Some((e, "refused".to_string())),
                        None if keys.iter().all(|k| index.value(t, p, e, family, k).unwrap_or(0.0) == 0.0) => {
                            Some((e, "none".to_string()))
                        }
                        None => None,
                    }
                })
                .collect(),
        };
        self.image(file, format!("{}: {what} per engine", index.traces[t].label), chart)
    }

    fn cycles_table(&self, t: usize) -> Table {
        let index = self.index;
        let mut header = vec!["engine".to_string()];
        for profile in &index.profiles {
            header.push(format!("cycles, {profile}"));
            header.push(format!("× native, {profile}"));
        }
        header.push("exits and traps".into());
        let mut table = Table::new("Cycles by engine and profile", header);
        for (e, engine) in index.engines.iter().enumerate() {
            let mut row = vec![engine.clone()];
            for p in 0..index.profiles.len() {
                let job = index.job(t, p, e);
                match job.and_then(|j| j.refusal) {
                    Some(_) => row.extend(["refused".to_string(), "—".to_string()]),
                    None => {
                        row.push(job.and_then(|j| j.get(CYCLES.0, CYCLES.1)).map_or("—".into(), count));
                        row.push(self.relative(t, p, e).map_or("—".into(), ratio));
                    }
                }
            }
            let exits: f64 = index.job(t, 0, e).map(|j| j.family(EXITS).iter().map(|(_, v)| v).sum()).unwrap_or(0.0);
            row.push(count(exits));
            table.rows.push(row);
        }
        table
    }

    /// A table of one family: a row per job (labelled by `label`), a column per key non-zero in some job.
    fn family_table(
        &self,
        caption: String,
        family: &str,
        jobs: &[(usize, usize, usize)],
        label: impl Fn(usize, usize) -> String,
        label_header: &str,
    ) -> Table {
        let index = self.index;
        let keys = index.nonzero_keys(family, jobs);
        let mut header = vec![label_header.to_string()];
        header.extend(keys.iter().cloned());
        let mut table = Table::new(caption, header);
        for &(t, p, e) in jobs {
            let Some(job) = index.job(t, p, e).filter(|j| j.refusal.is_none()) else { continue };
            let mut row = vec![label(t, e)];
            row.extend(keys.iter().map(|k| job.get(family, k).map_or("—".into(), count)));
            table.rows.push(row);
        }
        table
    }

    fn sites(&self, t: usize) -> Vec<Block> {
        let index = self.index;
        let mut blocks = Vec::new();
        for (e, engine) in index.engines.iter().enumerate() {
            let Some(job) = index.job(t, 0, e) else { continue };
            let mut sites = job.sites.clone();
            if sites.is_empty() {
                continue;
            }
            sites.sort_by(|a, b| b.count.cmp(&a.count).then(a.address.cmp(&b.address)).then(a.kind.cmp(&b.kind)));
            let header = ["address", "function", "kind", "reason", "count", "instruction"].map(String::from).to_vec();
            let mut table =
                Table::new(format!("{engine}: {} sites, the top {}", sites.len(), TOP_SITES.min(sites.len())), header);
            for site in sites.iter().take(TOP_SITES) {
                table.rows.push(vec![
                    format!("{:#x}", site.address),
                    site.function.clone(),
                    site.kind.clone(),
                    site.reason.clone(),
                    count(site.count as f64),
                    site.disassembly.clone(),
                ]);
            }
            blocks.push(Block::Table(table));
        }
        if blocks.is_empty() {
            blocks.push(paragraph("No engine entered the monitor on this workload."));
        }
        blocks
    }

    fn per_workload_family(&self, id: &str, title: &str, family: &str, engine: &str, intro: &str) -> Section {
        let index = self.index;
        let Some(e) = self.engine_index(engine) else {
            return section(id, title, 2, vec![paragraph(format!("The sweep did not run `{engine}`."))]);
        };
        let jobs: Vec<(usize, usize, usize)> = (0..index.traces.len()).map(|t| (t, 0, e)).collect();
        let table = self.family_table(
            format!("{engine}, profile {}", self.first_profile()),
            family,
            &jobs,
            |t, _| index.traces[t].label.clone(),
            "workload",
        );
        section(id, title, 2, vec![paragraph(intro), Block::Table(table)])
    }

    fn shadow(&self) -> Section {
        let index = self.index;
        let jobs: Vec<(usize, usize, usize)> = (0..index.traces.len())
            .flat_map(|t| (0..index.engines.len()).map(move |e| (t, 0, e)))
            .filter(|&(t, p, e)| index.job(t, p, e).is_some_and(|j| j.family(SHADOW).iter().any(|(_, v)| *v != 0.0)))
            .collect();
        let table = self.family_table(
            format!("Engines with shadow page tables, profile {}", self.first_profile()),
            SHADOW,
            &jobs,
            |t, e| format!("{} / {}", index.traces[t].label, index.engines[e]),
            "workload / engine",
        );
        let intro = "Shadow paging per workload and engine: hidden page faults (the shadow missed where the guest's \
                     tables had a mapping), true faults reflected to the guest, shadow root switches on CR3 writes, \
                     invalidations, and guest page-table pages write-protected for tracing.";
        section("shadow", "Shadow paging", 2, vec![paragraph(intro), Block::Table(table)])
    }

    /// Each workload recorded for both widths, engine by engine: what changed when x86 went to 64 bits.
    fn story(&self) -> Section {
        let index = self.index;
        let mut blocks = vec![paragraph(
            "The same workload built for x86-64 and for x86-32, engine by engine (`virtlab story` prints this for \
             one workload): cycles relative to native on each width, the ring the strategy runs the guest kernel \
             in (— when interpreted), and what the monitor's self-protection did per run — page-table switches (a \
             kernel in ring 3 beside user code, because long mode ignores segment limits) and system calls taken \
             through the fast trap gate without entering the monitor. A binary translator refuses the 64-bit guest \
             unless the host has long-mode segment limits (`bt.lmsle`).",
        )];
        let pairs = self.width_pairs();
        if pairs.is_empty() {
            blocks.push(paragraph("No workload in these results was recorded for both x86-64 and x86-32."));
        }
        for (wide, narrow) in pairs {
            let mut header = vec!["engine".to_string()];
            for arch in ["x86-64", "x86-32"] {
                for column in ["× native", "kernel ring", "page-table switches", "fast system calls"] {
                    header.push(format!("{arch} {column}"));
                }
            }
            let label = strip_arch(&index.traces[wide].parameters);
            let caption = format!("{} ({label}), profile {}", index.traces[wide].workload, self.first_profile());
            let mut table = Table::new(caption, header);
            for (e, engine) in index.engines.iter().enumerate() {
                let mut row = vec![engine.clone()];
                for t in [wide, narrow] {
                    let refused = index.job(t, 0, e).and_then(|j| j.refusal).is_some();
                    let number = |key: &str| index.value(t, 0, e, PROTECTION, key);
                    row.push(match self.relative(t, 0, e) {
                        Some(r) => ratio(r),
                        None if refused => "refused".into(),
                        None => "—".into(),
                    });
                    for key in ["kernel_ring", "page_table_switches", "fast_system_calls"] {
                        row.push(if refused {
                            "".into()
                        } else {
                            number(key).map_or("—".into(), |v| format!("{v}"))
                        });
                    }
                }
                table.rows.push(row);
            }
            blocks.push(Block::Table(table));
        }
        section("story", "x86-64 against x86-32", 2, blocks)
    }

    /// Pairs of traces (x86-64, x86-32) of one workload with the same parameters but `arch`.
    fn width_pairs(&self) -> Vec<(usize, usize)> {
        let traces = &self.index.traces;
        let mut pairs = Vec::new();
        for (wide, w) in traces.iter().enumerate().filter(|(_, t)| t.architecture == "x86-64") {
            let narrow = traces.iter().position(|n| {
                n.architecture == "x86-32"
                    && n.workload == w.workload
                    && strip_arch(&n.parameters) == strip_arch(&w.parameters)
            });
            if let Some(narrow) = narrow {
                pairs.push((wide, narrow));
            }
        }
        pairs
    }

    fn other_families(&self) -> Section {
        let index = self.index;
        let mut blocks = vec![paragraph(
            "Every other family of numbers the engines report (non-zero values only), so that a measurement added \
             to the engines shows here before the report learns its name. `holes` are wrong results a guest \
             would silently get; `detectable` are results that let a guest see it is virtualized.",
        )];
        for family in index.families.iter().filter(|f| !SHOWN_ELSEWHERE.contains(&f.as_str())) {
            let jobs: Vec<(usize, usize, usize)> = (0..index.traces.len())
                .flat_map(|t| (0..index.engines.len()).map(move |e| (t, 0, e)))
                .filter(|&(t, p, e)| {
                    index.job(t, p, e).is_some_and(|j| j.family(family).iter().any(|(_, v)| *v != 0.0))
                })
                .collect();
            if jobs.is_empty() {
                blocks.push(paragraph(format!("`{family}`: zero everywhere.")));
                continue;
            }
            blocks.push(Block::Table(self.family_table(
                format!("{family}, profile {}", self.first_profile()),
                family,
                &jobs,
                |t, e| format!("{} / {}", index.traces[t].label, index.engines[e]),
                "workload / engine",
            )));
        }
        section("other", "Other measurements", 2, blocks)
    }
}

/// A JSON value as a table cell: numbers as written (a `deviation` as a percentage), lists joined, objects as
/// `key: value` pairs.
fn cell(key: &str, value: &Value) -> String {
    match value {
        Value::Null => "—".into(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) if key == "deviation" => n.as_f64().map_or(n.to_string(), |d| format!("{:+.1}%", d * 100.0)),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(|v| cell("", v)).collect::<Vec<_>>().join(", "),
        Value::Object(map) => map.iter().map(|(k, v)| format!("{k}: {}", cell(k, v))).collect::<Vec<_>>().join("; "),
    }
}

/// A list of JSON objects as a table: one column per key in first-seen order, a row highlighted when one of its
/// yes/no fields says no.
fn json_table(caption: &str, items: &[Value]) -> Table {
    let mut header: Vec<String> = Vec::new();
    for object in items.iter().filter_map(Value::as_object) {
        for key in object.keys() {
            if !header.contains(key) {
                header.push(key.clone());
            }
        }
    }
    let mut table = Table::new(caption, header.clone());
    for (index, object) in items.iter().filter_map(Value::as_object).enumerate() {
        table.rows.push(header.iter().map(|k| object.get(k).map_or("—".into(), |v| cell(k, v))).collect());
        if object.values().any(|v| v == &Value::Bool(false)) {
            table.highlighted.push(index);
        }
    }
    table
}

fn validation_section(validation: Option<&Value>) -> Section {
    let Some(Value::Object(object)) = validation else {
        return section(
            "validation",
            "Validation",
            2,
            vec![paragraph(
                "This results directory has no `validation.json`. `cargo xtask bench` writes one; so does \
                 `virtlab validate adams-agesen --json > DIR/validation.json`.",
            )],
        );
    };
    let study = object.get("study").and_then(Value::as_str).unwrap_or("validation");
    let title = match study {
        "adams-agesen" => "Validation: Adams & Agesen (ASPLOS 2006)".to_string(),
        other => format!("Validation: {other}"),
    };
    let facts: Vec<String> = object
        .iter()
        .filter(|(_, v)| !matches!(v, Value::Array(items) if items.iter().any(Value::is_object)))
        .map(|(k, v)| format!("{k}: {}", cell(k, v)))
        .collect();
    let mut blocks = vec![
        paragraph(
            "The lab against the published table, cell by cell: cycles per iteration measured by the lab, the \
             paper's figure, and the deviation. Rows where a check fails are highlighted.",
        ),
        paragraph(facts.join("; ")),
    ];
    for (key, value) in object {
        if let Value::Array(items) = value {
            if items.iter().any(Value::is_object) {
                blocks.push(Block::Table(json_table(key, items)));
            }
        }
    }
    section("validation", title, 2, blocks)
}

/// What a stacked per-engine chart shows: one metric family, titled `what`, in `unit`, written to `file`.
struct Stacked<'a> {
    family: &'a str,
    what: &'a str,
    unit: &'a str,
    file: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_for_people() {
        assert_eq!(count(1234567.0), "1,234,567");
        assert_eq!(count(12.0), "12");
        assert_eq!(count(0.5), "0.50");
        assert_eq!(ratio(123.4), "123×");
        assert_eq!(ratio(12.34), "12.3×");
        assert_eq!(ratio(0.921), "0.92×");
        assert_eq!(slug("sensitive-kernel (iterations=5)"), "sensitive-kernel-iterations-5");
    }

    #[test]
    fn validation_tables_show_every_field_including_ones_added_later() {
        let value = json!({
            "study": "adams-agesen", "profile": "p4-2006", "iterations": [1000, 2000],
            "cells": [
                {"benchmark": "syscall", "engine": "bt", "lab": 2210.5, "paper": 2308.0, "deviation": -0.042,
                 "within_tolerance": true},
                {"benchmark": "in", "engine": "bt", "lab": 400.0, "paper": 216.0, "deviation": 0.852,
                 "within_tolerance": false, "provenance": {"callout": "published", "exit": "estimate"}},
            ],
        });
        let section = validation_section(Some(&value));
        assert_eq!(section.title, "Validation: Adams & Agesen (ASPLOS 2006)");
        let Block::Table(table) = &section.blocks[2] else { panic!("a table") };
        assert_eq!(
            table.header,
            ["benchmark", "engine", "lab", "paper", "deviation", "within_tolerance", "provenance"]
        );
        assert_eq!(table.rows[0][4], "-4.2%");
        assert_eq!(table.rows[0][6], "—");
        assert_eq!(table.rows[1][6], "callout: published; exit: estimate");
        assert_eq!(table.highlighted, [1]);
        let Block::Paragraph(facts) = &section.blocks[1] else { panic!("a paragraph") };
        assert_eq!(facts, "study: adams-agesen; profile: p4-2006; iterations: 1000, 2000");
    }

    /// `syscall` on both widths: trap-emulate with a ring-3 kernel switching page tables on x86-64 and a ring-1
    /// kernel on x86-32; bt refuses x86-64; `cpuid` on x86-64 only has no pair.
    #[test]
    fn the_story_pairs_the_two_widths_of_a_workload() {
        use crate::table::{Job, Manifest, Results, Row, Shard, REFUSED};
        let traces = [("syscall", "iterations=10", "x86-64"), ("syscall", "iterations=10,arch=x86-32", "x86-32")];
        let traces = traces.iter().copied().chain([("cpuid", "iterations=10", "x86-64")]);
        let mut rows = Vec::new();
        for (t, (workload, parameters, architecture)) in traces.enumerate() {
            for engine in ["native", "trap-emulate", "bt"] {
                let job = Job {
                    trace: format!("traces/{t}.vlt"),
                    workload: workload.into(),
                    parameters: parameters.into(),
                    architecture: architecture.into(),
                    engine: engine.into(),
                    profile: "p4-2006".into(),
                    options: String::new(),
                };
                let row = |family: &str, key: &str, value: f64| Row {
                    job: job.clone(),
                    family: family.into(),
                    key: key.into(),
                    value,
                };
                let wide = architecture == "x86-64";
                match engine {
                    "bt" if wide => rows.push(row(REFUSED, "bt: needs long-mode segment limits", 1.0)),
                    "native" => rows.extend([row(TOTALS, "cycles", 1000.0), row(PROTECTION, "kernel_ring", 0.0)]),
                    _ => rows.extend([
                        row(TOTALS, "cycles", if wide { 15000.0 } else { 9000.0 }),
                        row(PROTECTION, "kernel_ring", if wide { 3.0 } else { 1.0 }),
                        row(PROTECTION, "page_table_switches", if wide { 40.0 } else { 0.0 }),
                        row(PROTECTION, "fast_system_calls", 0.0),
                    ]),
                }
            }
        }
        let manifest = Manifest {
            written_by: "test".into(),
            shard: Shard { index: 0, count: 1, first: 0, end: 9, total: 9 },
            traces: (0..3).map(|t| format!("traces/{t}.vlt")).collect(),
            engines: ["native", "trap-emulate", "bt"].map(String::from).to_vec(),
            profiles: vec!["p4-2006".into()],
            options: String::new(),
        };
        let results = Results { manifest, rows, sites: Vec::new() };
        let index = Index::new(&results);
        let report = build(&index, None, String::new());
        let story = report.document.sections.iter().find(|s| s.id == "story").expect("a story section");
        let tables: Vec<&Table> =
            story.blocks.iter().filter_map(|b| if let Block::Table(t) = b { Some(t) } else { None }).collect();
        assert_eq!(tables.len(), 1, "cpuid has no x86-32 trace");
        let table = tables[0];
        assert_eq!(table.caption, "syscall (iterations=10), profile p4-2006");
        assert_eq!(table.rows[1], ["trap-emulate", "15.0×", "3", "40", "0", "9.00×", "1", "0", "0"]);
        assert_eq!(table.rows[2][..5], ["bt", "refused", "", "", ""]);
        assert_eq!(table.rows[2][5..], ["9.00×", "1", "0", "0"]);
    }
}
