//! Help texts at the reader's width.
//!
//! The subcommands' long help comes verbatim from their doc comments, so that examples, lists and file layouts
//! keep their indentation. But the source wraps them at its own 120 columns, and clap then wrapped every line
//! again at the terminal's width: each source line longer than that left a line of one or two words behind it,
//! and a list item's wrapped words lost its hanging indent. [`reflowed`] rewraps the texts at the width clap
//! uses: a paragraph's prose becomes one line, which clap wraps; an indented item (an example, a list entry, a
//! line of a file layout, with the deeper-indented lines that carry it on) is wrapped here, under its hanging
//! indent.

use clap::Command;

/// The width help is wrapped at: the terminal's, else `$COLUMNS`, else 100 (clap's own rule).
pub fn width() -> usize {
    let columns = terminal_size::terminal_size()
        .map(|(width, _)| usize::from(width.0))
        .or_else(|| std::env::var("COLUMNS").ok().and_then(|columns| columns.parse().ok()));
    columns.filter(|&columns| columns > 0).unwrap_or(100)
}

/// `command`, wrapping its help at `width`, with the long help of every subcommand at every depth
/// [rewrapped](rewrap) at that width.
pub fn reflowed(command: Command, width: usize) -> Command {
    fn subcommands(command: Command, width: usize) -> Command {
        command.mut_subcommands(|sub| {
            let sub = match sub.get_long_about().map(|text| rewrap(&text.to_string(), width)) {
                Some(text) => sub.long_about(text),
                None => sub,
            };
            subcommands(sub, width)
        })
    }
    subcommands(command.term_width(width), width)
}

/// Rewraps a text written with hard line breaks for `width` columns. A run of prose lines (not blank, not
/// indented) is joined into one line. An indented line and the lines after it that are indented deeper are one
/// item: its words are wrapped at `width`, the item's first line keeping its start and the rest indented as its
/// second line was (as its first, when it had one line). Blank lines stay.
pub fn rewrap(text: &str, width: usize) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    let mut out: Vec<String> = Vec::new();
    let mut after_prose = false;
    let mut next = 0;
    while next < lines.len() {
        let line = lines[next];
        next += 1;
        let indent = indent_of(line);
        if line.is_empty() || indent == 0 {
            match out.last_mut() {
                Some(last) if after_prose && !line.is_empty() => {
                    last.push(' ');
                    last.push_str(line);
                }
                _ => out.push(line.to_string()),
            }
            after_prose = !line.is_empty();
            continue;
        }
        after_prose = false;
        let mut words = line.to_string();
        let mut hanging = indent;
        let first_continuation = next;
        while next < lines.len() && !lines[next].is_empty() && indent_of(lines[next]) > indent {
            if next == first_continuation {
                hanging = indent_of(lines[next]);
            }
            words.push(' ');
            words.push_str(lines[next].trim_start());
            next += 1;
        }
        wrap_item(&words, hanging, width, &mut out);
    }
    out.join("\n")
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// Greedy wrapping of one indented item at `width`, breaking only at a single space (runs of spaces align
/// columns and stay with their line); the lines after the first start with `hanging` spaces. A word longer than
/// the width gets a line of its own.
fn wrap_item(item: &str, hanging: usize, width: usize, out: &mut Vec<String>) {
    let indent = indent_of(item);
    let mut line = String::from(&item[..indent]);
    let mut line_has_words = false;
    let mut rest = &item[indent..];
    while !rest.is_empty() {
        // The next word with the spaces that lead to it: a break may only come where exactly one space does.
        let word_start = rest.find(|c| c != ' ').unwrap_or(rest.len());
        let word_end = rest[word_start..].find(' ').map_or(rest.len(), |end| word_start + end);
        let (gap, word) = (&rest[..word_start], &rest[word_start..word_end]);
        rest = &rest[word_end..];
        let fits = line.chars().count() + gap.chars().count() + word.chars().count() <= width;
        if line_has_words && gap == " " && !fits {
            out.push(std::mem::replace(&mut line, " ".repeat(hanging)));
        } else {
            line.push_str(gap);
        }
        line.push_str(word);
        line_has_words = true;
    }
    out.push(line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn prose_is_joined_and_items_wrap_under_their_hanging_indent() {
        let text =
            "Record a guest.\n\nThe trace names the guest's\nfunctions: a catalog image's\ncome from labels.\n\n\
                    Files:\n  a.csv    the table as CSV\n  b.parquet  per engine: guest address, kind (exit,\n\
                    \x20            callout), reason\nAll written atomically.\n";
        assert_eq!(
            rewrap(text, 30),
            "Record a guest.\n\nThe trace names the guest's functions: a catalog image's come from labels.\n\n\
             Files:\n  a.csv    the table as CSV\n  b.parquet  per engine: guest\n             address, kind\n\
             \x20            (exit, callout),\n             reason\nAll written atomically."
        );
        assert_eq!(rewrap("  one two three four", 12), "  one two\n  three four");
        assert_eq!(rewrap("  averyveryverylongword x", 8), "  averyveryverylongword\n  x");
    }

    /// What wrapping a text twice leaves behind: an indented line longer than the width (clap wraps it again,
    /// without its hanging indent), or a prose line that ends before the next prose line's first word would
    /// have reached the width.
    fn wrapped_twice(help: &str, width: usize) -> Vec<String> {
        let lines: Vec<&str> = help.lines().collect();
        let long_items = lines.iter().filter(|line| indent_of(line) > 0 && line.chars().count() > width);
        let prose = |line: &str| !line.is_empty() && indent_of(line) == 0;
        let stranded = lines.windows(2).filter(|pair| prose(pair[0]) && prose(pair[1])).filter(|pair| {
            pair[0].chars().count() + 1 + pair[1].split(' ').next().unwrap_or("").chars().count() <= width
        });
        long_items.map(|line| format!("{line:?}")).chain(stranded.map(|pair| format!("{pair:?}"))).collect()
    }

    /// The long help of `command` and of every subcommand under it, by their command lines.
    fn long_helps(command: &mut Command, path: &str, helps: &mut Vec<(String, String)>) {
        helps.push((path.to_string(), command.render_long_help().to_string()));
        for sub in command.get_subcommands_mut() {
            let path = format!("{path} {}", sub.get_name());
            long_helps(sub, &path, helps);
        }
    }

    #[test]
    fn every_long_help_is_wrapped_once() {
        for width in [80, 100, 150] {
            let mut cli = reflowed(crate::Cli::command(), width);
            cli.build();
            let mut helps = Vec::new();
            long_helps(&mut cli, "virtlab", &mut helps);
            assert!(helps.len() >= 20, "{:?}", helps.iter().map(|(path, _)| path).collect::<Vec<_>>());
            for (path, help) in helps {
                let sub =
                    path.split(' ').skip(1).fold(&mut cli, |command, name| command.find_subcommand_mut(name).unwrap());
                if let Some(about) = sub.get_long_about() {
                    let twice = wrapped_twice(&about.to_string(), width);
                    assert!(twice.is_empty(), "`{path} --help` for {width} columns: {twice:#?}");
                }
                assert!(help.lines().all(|line| line.chars().count() <= width), "`{path} --help` at {width}:\n{help}");
                let twice = wrapped_twice(&help, width);
                assert!(twice.is_empty(), "`{path} --help` at {width} columns: {twice:#?}");
            }
        }
    }

    #[test]
    fn the_check_sees_help_wrapped_twice() {
        let mut cli = crate::Cli::command().term_width(100);
        cli.build();
        let record = cli.find_subcommand_mut("record").unwrap().render_long_help().to_string();
        assert!(!wrapped_twice(&record, 100).is_empty(), "{record}");
        let sweep = cli.find_subcommand("sweep").unwrap().get_long_about().unwrap().to_string();
        assert!(!wrapped_twice(&sweep, 80).is_empty(), "{sweep}");
    }
}
