//! The report as sections of paragraphs, tables and charts, rendered to one self-contained HTML page (inline
//! style, no script, images by relative path) or to Markdown: the same tables either way.

use std::fmt::Write;

/// A table: a header row and text cells; columns whose header is in `numeric` are right-aligned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub caption: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Rows drawn highlighted (for example a validation cell outside its tolerance), by index.
    pub highlighted: Vec<usize>,
}

impl Table {
    pub fn new(caption: impl Into<String>, header: Vec<String>) -> Self {
        Table { caption: caption.into(), header, ..Table::default() }
    }

    fn right_aligned(&self, column: usize) -> bool {
        !self.rows.is_empty()
            && self.rows.iter().all(|row| {
                row.get(column).is_none_or(|cell| {
                    cell.is_empty()
                        || cell == "—"
                        || cell.trim_start_matches(['+', '-', '×']).starts_with(|c: char| c.is_ascii_digit())
                })
            })
    }
}

/// An image in the report's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Path relative to `index.html`.
    pub file: String,
    pub alt: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Paragraph(String),
    Table(Table),
    /// Images shown side by side when they fit.
    Images(Vec<Image>),
    /// Blocks folded under a summary line (HTML) or under a bold line (Markdown).
    Details(String, Vec<Block>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub id: String,
    pub title: String,
    /// 2 for a top-level section, 3 below it.
    pub level: u8,
    pub blocks: Vec<Block>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub title: String,
    /// The one line that differs between two reports of the same results.
    pub timestamp: String,
    pub sections: Vec<Section>,
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            other => out.push(other),
        }
    }
    out
}

const STYLE: &str = "\
body{font-family:'DejaVu Sans',Verdana,sans-serif;margin:0 auto;max-width:1180px;padding:0 16px 48px;color:#1a1a1a;line-height:1.45}
h1{margin-top:24px}h2{border-bottom:2px solid #ccc;padding-bottom:4px;margin-top:40px}h3{margin-top:28px}
table{border-collapse:collapse;margin:10px 0 18px;font-size:14px}
caption{text-align:left;font-weight:bold;padding:4px 0}
th,td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}th{background:#f0f0f0;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.hl td{background:#fde2e2}
code{font-family:'DejaVu Sans Mono',monospace;font-size:13px}
.images{display:flex;flex-wrap:wrap;gap:8px}.images img{max-width:100%;height:auto;border:1px solid #ddd}
nav ul{columns:3;font-size:14px}details{margin:8px 0}summary{cursor:pointer;font-weight:bold}
p.timestamp{color:#666;font-size:13px}";

impl Document {
    /// The whole page. The timestamp sits alone on one line, so two reports of the same results differ there only.
    pub fn html(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">");
        let _ = writeln!(out, "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
        let _ = writeln!(out, "<title>{}</title>\n<style>\n{STYLE}\n</style>\n</head>\n<body>", escape(&self.title));
        let _ = writeln!(out, "<h1>{}</h1>", escape(&self.title));
        let _ = writeln!(out, "<p class=\"timestamp\">{}</p>", escape(&self.timestamp));
        let _ = writeln!(out, "<nav><ul>");
        for section in self.sections.iter().filter(|s| s.level == 2) {
            let _ = writeln!(out, "<li><a href=\"#{}\">{}</a></li>", section.id, escape(&section.title));
        }
        let _ = writeln!(out, "</ul></nav>");
        for section in &self.sections {
            let level = section.level;
            let _ = writeln!(out, "<h{level} id=\"{}\">{}</h{level}>", section.id, escape(&section.title));
            for block in &section.blocks {
                html_block(&mut out, block);
            }
        }
        let _ = writeln!(out, "</body>\n</html>");
        out
    }

    /// The same sections as Markdown, without the images and without the timestamp.
    pub fn markdown(&self) -> String {
        let mut out = format!("# {}\n", self.title);
        for section in &self.sections {
            let _ = write!(out, "\n{} {}\n", "#".repeat(section.level as usize), section.title);
            for block in &section.blocks {
                markdown_block(&mut out, block);
            }
        }
        out
    }
}

fn html_block(out: &mut String, block: &Block) {
    match block {
        Block::Paragraph(text) => {
            let _ = writeln!(out, "<p>{}</p>", inline_code(&escape(text)));
        }
        Block::Table(table) => html_table(out, table),
        Block::Images(images) => {
            let _ = writeln!(out, "<div class=\"images\">");
            for image in images {
                let _ = writeln!(
                    out,
                    "<img src=\"{}\" alt=\"{}\" width=\"{}\" height=\"{}\">",
                    escape(&image.file),
                    escape(&image.alt),
                    image.width,
                    image.height
                );
            }
            let _ = writeln!(out, "</div>");
        }
        Block::Details(summary, blocks) => {
            let _ = writeln!(out, "<details>\n<summary>{}</summary>", escape(summary));
            for inner in blocks {
                html_block(out, inner);
            }
            let _ = writeln!(out, "</details>");
        }
    }
}

/// `text` with `backquoted` parts in <code>: paragraphs name commands and options that way.
fn inline_code(text: &str) -> String {
    let mut out = String::new();
    for (index, part) in text.split('`').enumerate() {
        if index % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn html_table(out: &mut String, table: &Table) {
    let _ = writeln!(out, "<table>");
    if !table.caption.is_empty() {
        let _ = writeln!(out, "<caption>{}</caption>", escape(&table.caption));
    }
    let header: String = table.header.iter().map(|h| format!("<th>{}</th>", escape(h))).collect();
    let _ = writeln!(out, "<thead><tr>{header}</tr></thead>\n<tbody>");
    let numeric: Vec<bool> = (0..table.header.len()).map(|c| table.right_aligned(c)).collect();
    for (index, row) in table.rows.iter().enumerate() {
        let class = if table.highlighted.contains(&index) { " class=\"hl\"" } else { "" };
        let cells: String = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                let class = if numeric.get(c).copied().unwrap_or(false) { " class=\"n\"" } else { "" };
                format!("<td{class}>{}</td>", escape(cell))
            })
            .collect();
        let _ = writeln!(out, "<tr{class}>{cells}</tr>");
    }
    let _ = writeln!(out, "</tbody>\n</table>");
}

fn markdown_cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn markdown_block(out: &mut String, block: &Block) {
    match block {
        Block::Paragraph(text) => {
            let _ = write!(out, "\n{text}\n");
        }
        Block::Table(table) => {
            if !table.caption.is_empty() {
                let _ = write!(out, "\n**{}**\n", table.caption);
            }
            let cells = |row: &[String]| row.iter().map(|c| markdown_cell(c)).collect::<Vec<_>>().join(" | ");
            let _ = write!(out, "\n| {} |\n", cells(&table.header));
            let rule: Vec<&str> =
                (0..table.header.len()).map(|c| if table.right_aligned(c) { "---:" } else { "---" }).collect();
            let _ = writeln!(out, "|{}|", rule.join("|"));
            for row in &table.rows {
                let _ = writeln!(out, "| {} |", cells(row));
            }
        }
        Block::Images(_) => {}
        Block::Details(summary, blocks) => {
            let _ = write!(out, "\n**{summary}**\n");
            for inner in blocks {
                markdown_block(out, inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> Document {
        let mut table = Table::new("Cycles", vec!["engine".into(), "cycles".into()]);
        table.rows = vec![vec!["bt".into(), "1,200".into()], vec!["a|b <x>".into(), "—".into()]];
        table.highlighted = vec![1];
        Document {
            title: "virtlab report".into(),
            timestamp: "Generated at noon".into(),
            sections: vec![Section {
                id: "s1".into(),
                title: "Summary".into(),
                level: 2,
                blocks: vec![
                    Block::Paragraph("Run `cargo xtask bench`.".into()),
                    Block::Table(table),
                    Block::Images(vec![Image { file: "charts/a.png".into(), alt: "A".into(), width: 9, height: 4 }]),
                ],
            }],
        }
    }

    #[test]
    fn html_escapes_aligns_numbers_and_puts_the_timestamp_on_one_line() {
        let html = document().html();
        assert!(html.contains("<td>a|b &lt;x&gt;</td><td class=\"n\">—</td>"), "{html}");
        assert!(html.contains("<tr class=\"hl\">"));
        assert!(html.contains("<p>Run <code>cargo xtask bench</code>.</p>"));
        assert!(html.contains("<img src=\"charts/a.png\" alt=\"A\" width=\"9\" height=\"4\">"));
        assert_eq!(html.lines().filter(|l| l.contains("Generated at noon")).count(), 1);
        assert!(!html.contains("<script") && !html.contains("http"), "self-contained");
    }

    #[test]
    fn markdown_has_the_same_table_without_images() {
        let md = document().markdown();
        assert!(md.contains("| engine | cycles |\n|---|---:|\n| bt | 1,200 |\n| a\\|b <x> | — |\n"), "{md}");
        assert!(!md.contains("charts/a.png") && !md.contains("noon"));
    }
}
