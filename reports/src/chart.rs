//! Bar charts as PNG files (plotters' bitmap backend), with text drawn in DejaVu Sans that the binary carries: a
//! fresh machine has no system fonts, and plotters finds none of its own with the `ttf` feature off.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::Error;

/// The family name the charts ask for; [`register_fonts`] gives it DejaVu Sans.
const FONT: &str = "sans-serif";
pub const WIDTH: u32 = 960;
const MIN_HEIGHT: u32 = 440;
const LEGEND_WIDTH: u32 = 250;
const LEGEND_LINE: u32 = 22;

/// How bars of one category are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One bar per series, side by side; a log scale when the values span more than two decades.
    Grouped,
    /// One bar per category, the series stacked.
    Stacked,
}

/// One legend entry and its value in each category (`None`: nothing to draw there).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
    pub layout: Layout,
    /// A dashed reference line at this value (for example 1 = native).
    pub reference: Option<(f64, String)>,
    /// Text written in a category instead of bars (for example why an engine did not run).
    pub notes: Vec<(usize, String)>,
}

/// Colors from ColorBrewer's qualitative sets, in legend order; distinguishable on white and in grey print.
const PALETTE: [RGBColor; 20] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(174, 199, 232),
    RGBColor(255, 187, 120),
    RGBColor(152, 223, 138),
    RGBColor(255, 152, 150),
    RGBColor(197, 176, 213),
    RGBColor(196, 156, 148),
    RGBColor(247, 182, 210),
    RGBColor(199, 199, 199),
    RGBColor(219, 219, 141),
    RGBColor(158, 218, 229),
];

fn color(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

/// Registers DejaVu Sans (regular and bold) as [`FONT`] with plotters, once per process.
fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (style, bytes) in [(FontStyle::Normal, dejavu::sans::regular()), (FontStyle::Bold, dejavu::sans::bold())] {
            // The bytes are a font file compiled into the binary: parsing them cannot fail at run time
            // unless the dejavu crate itself is broken.
            plotters::style::register_font(FONT, style, bytes).unwrap_or_else(|_| panic!("DejaVu Sans parses"));
        }
    });
}

impl BarChart {
    /// The image's height: enough for the legend.
    pub fn height(&self) -> u32 {
        MIN_HEIGHT.max(110 + LEGEND_LINE * (self.series.len() + usize::from(self.reference.is_some())) as u32)
    }

    /// Whether the grouped values span more than two decades, so bars are drawn on a log scale.
    fn log_scale(&self) -> bool {
        let positive = || self.series.iter().flat_map(|s| s.values.iter().flatten().copied()).filter(|v| *v > 0.0);
        let (min, max) = positive().fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        self.layout == Layout::Grouped && max > 0.0 && max / min > 100.0
    }

    /// Draws the chart into a PNG file at `path`.
    pub fn draw(&self, path: &Path) -> crate::Result<()> {
        register_fonts();
        let failed = |e: &dyn std::fmt::Display| Error::Chart { path: path.to_path_buf(), message: e.to_string() };
        let root = BitMapBackend::new(path, (WIDTH, self.height())).into_drawing_area();
        self.draw_on(&root).map_err(|e| failed(&e))?;
        root.present().map_err(|e| failed(&e))
    }

    fn draw_on(&self, root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), DrawError> {
        root.fill(&WHITE)?;
        let (plot, legend) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
        let log = self.log_scale();
        let bars = self.bars(log);
        let (y_min, y_max) = self.y_range(&bars, log);
        let n = self.categories.len().max(1) as f64;
        let title_font = (FONT, 22, FontStyle::Bold).into_font();
        let mut chart = ChartBuilder::on(&plot)
            .caption(&self.title, title_font)
            .margin(14)
            .margin_bottom(8)
            .x_label_area_size(62)
            .y_label_area_size(86)
            .build_cartesian_2d(0.0..n, y_min..y_max)?;
        let tick = |v: &f64| if log { log_tick(*v) } else { si(*v) };
        let y_desc = if log { format!("{} (log scale)", self.y_label) } else { self.y_label.clone() };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(if log { (y_max - y_min).round() as usize + 1 } else { 8 })
            .y_label_formatter(&tick)
            .y_desc(y_desc)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .light_line_style(RGBColor(235, 235, 235))
            .max_light_lines(if log { 0 } else { 4 })
            .draw()?;
        chart.draw_series(
            bars.iter().map(|bar| Rectangle::new([(bar.x0, bar.y0), (bar.x1, bar.y1)], color(bar.series).filled())),
        )?;
        if let Some((value, _)) = &self.reference {
            let y = if log { value.log10() } else { *value };
            let dashes = (0..(n * 40.0) as usize).step_by(2).map(|i| {
                PathElement::new(vec![(i as f64 / 40.0, y), ((i + 1) as f64 / 40.0, y)], BLACK.stroke_width(2))
            });
            chart.draw_series(dashes)?;
        }
        for (index, note) in &self.notes {
            let (x, y) = chart.backend_coord(&(*index as f64 + 0.5, y_min));
            root.draw(&Text::new(note.clone(), (x, y - 10), text_style(14).pos(Pos::new(HPos::Center, VPos::Bottom))))?;
        }
        for (index, name) in self.categories.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(index as f64 + 0.5, y_min));
            root.draw(&Text::new(name.clone(), (x, y + 8), text_style(15).pos(Pos::new(HPos::Center, VPos::Top))))?;
        }
        let (x_mid, y_axis) = chart.backend_coord(&(n / 2.0, y_min));
        let axis_font = text_style(16).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new(self.x_label.clone(), (x_mid, y_axis + 34), axis_font))?;
        self.draw_legend(&legend)
    }

    fn draw_legend(&self, area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), DrawError> {
        let top = 60;
        for (index, series) in self.series.iter().enumerate() {
            let y = top + (index as u32 * LEGEND_LINE) as i32;
            area.draw(&Rectangle::new([(4, y), (20, y + 14)], color(index).filled()))?;
            area.draw(&Text::new(
                series.name.clone(),
                (28, y + 7),
                text_style(14).pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        if let Some((_, label)) = &self.reference {
            let y = top + (self.series.len() as u32 * LEGEND_LINE) as i32 + 7;
            area.draw(&PathElement::new(vec![(4, y), (9, y)], BLACK.stroke_width(2)))?;
            area.draw(&PathElement::new(vec![(14, y), (20, y)], BLACK.stroke_width(2)))?;
            area.draw(&Text::new(label.clone(), (28, y), text_style(14).pos(Pos::new(HPos::Left, VPos::Center))))?;
        }
        Ok(())
    }

    /// The rectangles to draw: (x from, x to, y from, y to, series) in chart coordinates.
    fn bars(&self, log: bool) -> Vec<Bar> {
        let mut bars = Vec::new();
        let groups = self.series.len().max(1) as f64;
        for category in 0..self.categories.len() {
            let mut stacked = 0.0;
            for (index, series) in self.series.iter().enumerate() {
                let Some(value) = series.values.get(category).copied().flatten() else { continue };
                let left = category as f64;
                match self.layout {
                    Layout::Grouped => {
                        let width = 0.8 / groups;
                        let x0 = left + 0.1 + width * index as f64;
                        let y1 = if log { value.max(f64::MIN_POSITIVE).log10() } else { value };
                        bars.push(Bar { x0, x1: x0 + width * 0.92, y0: f64::NAN, y1, series: index });
                    }
                    Layout::Stacked => {
                        if value > 0.0 {
                            bars.push(Bar {
                                x0: left + 0.2,
                                x1: left + 0.8,
                                y0: stacked,
                                y1: stacked + value,
                                series: index,
                            });
                        }
                        stacked += value.max(0.0);
                    }
                }
            }
        }
        // Grouped bars grow from the bottom of the axis, which is known once every bar is.
        let floor = if log { log_floor(&bars) } else { 0.0 };
        for bar in bars.iter_mut().filter(|b| b.y0.is_nan()) {
            bar.y0 = floor;
        }
        bars
    }

    fn y_range(&self, bars: &[Bar], log: bool) -> (f64, f64) {
        let top = bars.iter().map(|b| b.y1).fold(f64::MIN, f64::max);
        if log {
            (log_floor(bars), top.ceil().max(log_floor(bars) + 1.0))
        } else if top > 0.0 {
            (0.0, top * 1.08)
        } else {
            (0.0, 1.0)
        }
    }
}

/// The bottom of a log axis: at least half a decade below the smallest bar and below 1, so a bar of 1 (native)
/// still shows.
fn log_floor(bars: &[Bar]) -> f64 {
    (bars.iter().map(|b| b.y1).filter(|y| y.is_finite()).fold(f64::MAX, f64::min).min(0.0) - 0.5).floor()
}

struct Bar {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    series: usize,
}

type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

fn text_style(size: u32) -> TextStyle<'static> {
    (FONT, size).into_font().color(&BLACK)
}

/// A tick of a log axis (the value is a power of ten's exponent): `0.1`, `1`, `10`, `1k`; other ticks unlabelled.
fn log_tick(exponent: f64) -> String {
    if (exponent - exponent.round()).abs() > 1e-9 {
        return String::new();
    }
    let value = 10f64.powi(exponent.round() as i32);
    if value < 1.0 {
        format!("{value}")
    } else {
        si(value)
    }
}

/// `950`, `1.5k`, `12M`: short numbers for axis ticks.
pub fn si(value: f64) -> String {
    let magnitude = value.abs();
    let (scaled, suffix) = match magnitude {
        m if m >= 1e12 => (value / 1e12, "T"),
        m if m >= 1e9 => (value / 1e9, "G"),
        m if m >= 1e6 => (value / 1e6, "M"),
        m if m >= 1e3 => (value / 1e3, "k"),
        _ => (value, ""),
    };
    let text = format!("{scaled:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers() {
        assert_eq!(si(950.0), "950");
        assert_eq!(si(1500.0), "1.5k");
        assert_eq!(si(12_000_000.0), "12M");
        assert_eq!(si(0.25), "0.25");
        assert_eq!(log_tick(3.0), "1k");
        assert_eq!(log_tick(-1.0), "0.1");
        assert_eq!(log_tick(0.5), "");
    }

    fn chart(values: Vec<Option<f64>>) -> BarChart {
        BarChart {
            title: "t".into(),
            x_label: "engine".into(),
            y_label: "cycles".into(),
            categories: vec!["a".into(), "b".into(), "c".into()],
            series: vec![Series { name: "p".into(), values }],
            layout: Layout::Grouped,
            reference: None,
            notes: vec![],
        }
    }

    #[test]
    fn grouped_bars_go_log_past_two_decades() {
        assert!(!chart(vec![Some(1.0), Some(90.0), None]).log_scale());
        assert!(chart(vec![Some(0.5), Some(90.0), None]).log_scale());
        let log = chart(vec![Some(0.5), Some(90.0), None]);
        let bars = log.bars(true);
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[0].y0, -1.0, "bars start at the decade below the smallest");
        assert_eq!(log.y_range(&bars, true), (-1.0, 2.0));
    }
}
