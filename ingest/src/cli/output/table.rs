//! Tables for people: a header row, then one line per row, columns aligned
//! with spaces and no borders. comfy-table lays the columns out; this file
//! decides what a cell may hold (one line, at most so wide) and where the
//! spaces go.

use std::fmt;
use std::io::{self, Write};

use comfy_table::{CellAlignment, ColumnConstraint, Width, presets};

/// The mark of a clipped cell.
const CUT: char = '…';

/// comfy-table measures widths in `u16` and wraps what is wider, so no cell
/// is laid out longer than this many characters (two columns each at
/// worst), whatever the table's own clip.
const LONGEST_CELL: usize = 30_000;

/// `2026-11-23T22:51:20Z`.
const TIME_WIDTH: usize = 20;

/// The least a clipped column keeps of its cells, or its header's width if
/// wider.
const NARROWEST: usize = 6;

/// One column of a [`Table`]: its header, its alignment, its least width
/// and the spaces before it.
#[derive(Debug, Clone)]
pub struct Column {
    header: String,
    right: bool,
    /// At least this many characters wide, however narrow the values: a
    /// list of one row lines up with a list of many.
    min_width: usize,
    /// Spaces between this column and the one before it (none before the
    /// first).
    gap: usize,
    /// Never clipped to fit the terminal: numbers and times, which a cut
    /// would make wrong rather than short.
    keep: bool,
}

impl Column {
    /// Text: left-aligned.
    pub fn left(header: impl Into<String>) -> Self {
        Self {
            header: header.into(),
            right: false,
            min_width: 0,
            gap: 2,
            keep: false,
        }
    }

    /// Numbers: right-aligned, header too, never clipped.
    pub fn right(header: impl Into<String>) -> Self {
        Self {
            right: true,
            keep: true,
            ..Self::left(header)
        }
    }

    /// Times ([`super::time`]): as wide as one, never clipped.
    pub fn time(header: impl Into<String>) -> Self {
        Self {
            keep: true,
            ..Self::left(header).min_width(TIME_WIDTH)
        }
    }

    pub fn min_width(self, min_width: usize) -> Self {
        Self { min_width, ..self }
    }

    /// Never clipped to fit: a short word from a fixed set (a state, a
    /// severity), which a cut would make unreadable.
    pub fn keep(self) -> Self {
        Self { keep: true, ..self }
    }
}

/// Rows under a header, each on one line. Every column is as wide as its
/// widest cell (and at least its [`Column::min_width`]), except a
/// left-aligned last column, which is not padded at all: a long last value
/// costs no other line anything.
#[derive(Debug, Clone)]
pub struct Table {
    columns: Vec<Column>,
    header: bool,
    rows: Vec<Vec<String>>,
    /// The most characters of a cell (see [`clip`]).
    clip: usize,
    /// Whether lines lose their trailing spaces.
    trim: bool,
    /// The widest a line may be: cells of the widest columns are clipped
    /// until the table fits.
    fit: usize,
}

impl Table {
    pub fn new(columns: impl IntoIterator<Item = Column>) -> Self {
        Self {
            columns: columns.into_iter().collect(),
            header: true,
            rows: Vec::new(),
            clip: LONGEST_CELL,
            trim: false,
            fit: super::terminal_width(),
        }
    }

    /// Adds a row: a cell per column, as text. A control character (a line
    /// break, a tab) is shown escaped, so that a row stays one line.
    pub fn row<S: AsRef<str>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Self {
        let row: Vec<String> = cells.into_iter().map(|c| one_line(c.as_ref())).collect();
        debug_assert_eq!(row.len(), self.columns.len(), "a cell per column");
        self.rows.push(row);
        self
    }

    /// Adds a row per item, its cells made by `cells`.
    pub fn rows<T, S: AsRef<str>, R: IntoIterator<Item = S>>(
        mut self,
        items: impl IntoIterator<Item = T>,
        mut cells: impl FnMut(T) -> R,
    ) -> Self {
        for item in items {
            self.row(cells(item));
        }
        self
    }

    /// Clips every cell to `width` characters, the cut marked with `…`, so
    /// that a long value does not push the table past a terminal's width.
    pub fn clip(self, width: usize) -> Self {
        Self {
            clip: width.min(LONGEST_CELL),
            ..self
        }
    }

    /// Lines of at most `width` characters (the terminal's width unless
    /// set).
    pub fn fit(self, width: usize) -> Self {
        Self { fit: width, ..self }
    }

    /// No header row.
    pub fn headless(self) -> Self {
        Self {
            header: false,
            ..self
        }
    }

    /// Lines end with their last character that is not a space: an empty
    /// last cell leaves no separator behind.
    pub fn trim_end(self) -> Self {
        Self { trim: true, ..self }
    }

    /// Each column's width in terminal columns: its widest cell or header,
    /// or its least width. What a later table of more rows needs to line up
    /// with this one ([`Column::min_width`]).
    pub fn widths(&self) -> Vec<usize> {
        let laid_out = self.laid_out(self.columns.len());
        let content = laid_out.column_max_content_widths();
        self.columns
            .iter()
            .zip(content)
            .map(|(column, width)| column.min_width.max(width.into()))
            .collect()
    }

    /// Writes the table, a line per row, each ending with `\n`.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        for line in self.lines() {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    fn lines(&self) -> Vec<String> {
        let fitted = self.fitted();
        let gaps: usize = self.columns.iter().skip(1).map(|c| c.gap).sum();
        if self.header && fitted.widths().iter().sum::<usize>() + gaps > self.fit {
            return self.records();
        }
        fitted.lines_as_they_are()
    }

    /// A table too wide for any clipping, as `psql`'s expanded display: a
    /// line per column of each row (header, then value), rows apart by a
    /// blank line.
    fn records(&self) -> Vec<String> {
        let label = self
            .columns
            .iter()
            .map(|c| c.header.chars().count())
            .max()
            .unwrap_or(0);
        let value_width = self.fit.saturating_sub(label + 2).max(NARROWEST);
        let mut lines = Vec::new();
        for (n, row) in self.rows.iter().enumerate() {
            if n > 0 {
                lines.push(String::new());
            }
            for (column, cell) in self.columns.iter().zip(row) {
                let value = clip(cell, value_width.min(self.clip));
                let line = format!("{:<label$}  {value}", column.header);
                lines.push(line.trim_end().to_owned());
            }
        }
        if self.rows.is_empty() {
            lines.push("(no rows)".to_owned());
        }
        lines
    }

    /// This table with cells clipped so that its lines fit [`Table::fit`]:
    /// the widest text column gives up a character at a time, down to its
    /// header's width, then to [`NARROWEST`]; then, if that is not enough,
    /// numbers and times give up what their header is wider than their
    /// values (the header is clipped, never a value). Least widths give way
    /// too.
    fn fitted(&self) -> Table {
        let gaps: usize = self.columns.iter().skip(1).map(|c| c.gap).sum();
        let fitted = self.clone();
        if self.widths().iter().sum::<usize>() + gaps <= self.fit {
            return fitted;
        }
        let width_of = |i: usize, with_header: bool| {
            let cells = self.rows.iter().map(|row| row[i].as_str());
            let header = (with_header && self.header).then_some(self.columns[i].header.as_str());
            header
                .into_iter()
                .chain(cells)
                .map(|c| clip(c, self.clip).chars().count())
                .max()
                .unwrap_or(0)
        };
        let mut widths = Vec::new();
        let mut floors = Vec::new();
        for (i, column) in self.columns.iter().enumerate() {
            // Least widths line lists up; not worth a cut value.
            let least = if column.keep && !self.rows.is_empty() {
                column.min_width
            } else {
                0
            };
            let width = width_of(i, true).max(least);
            widths.push(width);
            floors.push(if column.keep {
                [width; 3]
            } else {
                let narrowest = width.min(NARROWEST);
                let header = column.header.chars().count().max(narrowest);
                [header, narrowest, narrowest]
            });
            if column.keep {
                floors[i][2] = width_of(i, false).max(least).max(1);
            }
        }
        // Text down to its header's width, then down to NARROWEST, then
        // headers of numbers and times down to their values'.
        let phases: [Vec<usize>; 3] = [0, 1, 2].map(|p| floors.iter().map(|f| f[p]).collect());
        for floor in &phases {
            while widths.iter().sum::<usize>() + gaps > self.fit {
                let Some(widest) = (0..widths.len())
                    .filter(|&i| widths[i] > floor[i])
                    .max_by_key(|&i| (widths[i], i))
                else {
                    break;
                };
                widths[widest] -= 1;
            }
        }
        let mut fitted = fitted;
        for (column, &width) in fitted.columns.iter_mut().zip(&widths) {
            column.min_width = column.min_width.min(width);
            if column.header.chars().count() > width {
                column.header = clip(&column.header, width);
            }
        }
        for row in &mut fitted.rows {
            for (cell, &width) in row.iter_mut().zip(&widths) {
                if cell.chars().count() > width {
                    *cell = clip(cell, width);
                }
            }
        }
        fitted
    }

    fn lines_as_they_are(&self) -> Vec<String> {
        let Some(last) = self.columns.last() else {
            return Vec::new();
        };
        // A left-aligned last column is appended to the lines comfy-table
        // lays out from the others, unpadded.
        let ragged = !last.right;
        let laid = self.columns.len() - usize::from(ragged);
        let mut lines: Vec<String> = if laid == 0 {
            vec![String::new(); self.row_count()]
        } else {
            self.laid_out(laid).lines().collect()
        };
        debug_assert_eq!(lines.len(), self.row_count(), "one line per row");
        if ragged {
            let gap = if laid == 0 { 0 } else { last.gap };
            for (line, cell) in lines.iter_mut().zip(self.column_cells(laid)) {
                line.extend(std::iter::repeat_n(' ', gap));
                line.push_str(&clip(cell, self.clip));
            }
        }
        if self.trim {
            for line in &mut lines {
                line.truncate(line.trim_end_matches(' ').len());
            }
        }
        lines
    }

    fn row_count(&self) -> usize {
        self.rows.len() + usize::from(self.header)
    }

    /// Column `index` from the top: its header (if shown), then its cells.
    fn column_cells(&self, index: usize) -> impl Iterator<Item = &str> {
        let header = self.header.then_some(self.columns[index].header.as_str());
        header
            .into_iter()
            .chain(self.rows.iter().map(move |row| row[index].as_str()))
    }

    /// The first `count` columns, laid out by comfy-table: no borders, the
    /// gaps as padding before each column.
    fn laid_out(&self, count: usize) -> comfy_table::Table {
        let mut table = comfy_table::Table::new();
        table.load_style(presets::NOTHING);
        if self.header {
            table.set_header(
                self.columns[..count]
                    .iter()
                    .map(|c| clip(&c.header, self.clip)),
            );
        }
        for row in &self.rows {
            table.add_row(row[..count].iter().map(|c| clip(c, self.clip)));
        }
        for (index, spec) in self.columns[..count].iter().enumerate() {
            let gap = if index == 0 { 0 } else { spec.gap };
            let Some(column) = table.column_mut(index) else {
                continue;
            };
            column.set_padding((to_u16(gap), 0));
            column.set_cell_alignment(if spec.right {
                CellAlignment::Right
            } else {
                CellAlignment::Left
            });
            if spec.min_width > 0 {
                // comfy-table's least width includes the padding.
                column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(to_u16(
                    spec.min_width + gap,
                ))));
            }
        }
        table
    }
}

impl fmt::Display for Table {
    /// The lines, without a newline after the last.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("\n"))
    }
}

fn to_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// `s` in at most `width` characters, the cut marked with `…`.
fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut clipped: String = s.chars().take(width.saturating_sub(1)).collect();
        clipped.push(CUT);
        clipped
    }
}

/// `s` with its control characters escaped (`\n`, `\t`, `\u{1b}`).
fn one_line(s: &str) -> String {
    if !s.contains(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn people() -> Table {
        let mut table = Table::new([
            Column::right("ID"),
            Column::left("NAME"),
            Column::right("SCORE").min_width(7),
            Column::left("NOTE"),
        ]);
        table
            .row(["7", "ada", "12.5", "first"])
            .row(["1234", "grace hopper", "3", ""]);
        table
    }

    #[test]
    fn columns_align_under_their_headers() {
        assert_eq!(
            people().to_string(),
            "  ID  NAME            SCORE  NOTE\n   \
                7  ada              12.5  first\n\
             1234  grace hopper        3  "
        );
    }

    #[test]
    fn trimmed_lines_end_with_their_last_character() {
        let text = people().trim_end().to_string();
        assert_eq!(
            text.lines().last(),
            Some("1234  grace hopper        3"),
            "{text}"
        );
        let mut written = Vec::new();
        people().trim_end().write(&mut written).unwrap();
        assert_eq!(String::from_utf8(written).unwrap(), text + "\n");
    }

    #[test]
    fn headless_tables_have_only_rows() {
        let mut table = Table::new([Column::left("K").min_width(4), Column::left("V")]).headless();
        table.row(["a", "1"]).row(["bbb", "2"]);
        assert_eq!(table.to_string(), "a     1\nbbb   2");
    }

    #[test]
    fn widths_count_headers_cells_and_least_widths() {
        assert_eq!(people().widths(), [4, 12, 7, 5]);
        // Characters, not bytes.
        let mut table = Table::new([Column::left("X")]);
        table.row(["äöü"]);
        assert_eq!(table.widths(), [3]);
    }

    #[test]
    fn clipping_marks_the_cut_and_counts_characters() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "ab…");
        assert_eq!(clip("äöüß", 2), "ä…");
        assert_eq!(clip("abc", 0), "…");

        let mut table = Table::new([Column::left("KIND"), Column::left("STATE")]).clip(6);
        table
            .row(["set-interval 500ms", "acked"])
            .row(["ping", "expired"]);
        assert_eq!(
            table.to_string(),
            "KIND    STATE\nset-i…  acked\nping    expir…"
        );
    }

    #[test]
    fn a_row_stays_one_line() {
        let mut table = Table::new([Column::left("A"), Column::left("B")]);
        table.row(["two\nlines", "tab\there"]);
        assert_eq!(table.to_string(), "A           B\ntwo\\nlines  tab\\there");
    }

    #[test]
    fn the_widest_columns_give_way_until_the_table_fits() {
        let long = "sim-0000000000000000000000000001";
        let mut table = Table::new([
            Column::left("DEVICE").min_width(24),
            Column::left("NAME").min_width(24),
            Column::right("SEQUENCE").min_width(10),
            Column::left("NOTE"),
        ])
        .fit(60);
        table
            .row([
                long,
                "a pump in the basement by the stairs",
                "12",
                "a long note",
            ])
            .row(["d2", "short", "1234567", ""]);
        let text = table.to_string();
        for line in text.lines() {
            assert!(line.chars().count() <= 60, "{line:?} in\n{text}");
        }
        assert!(text.contains('…'), "{text}");
        // Narrow columns are left whole.
        assert!(text.contains("1234567"), "{text}");
        // A table that fits is not touched.
        assert_eq!(people().fit(80).to_string(), people().to_string());
    }

    #[test]
    fn a_table_too_wide_for_clipping_is_shown_a_record_at_a_time() {
        let columns = (0..14).map(|i| Column::left(format!("column_{i}")));
        let mut table = Table::new(columns).fit(80);
        table.row((0..14).map(|i| format!("value {i}")));
        table.row((0..14).map(|i| format!("{} {i}", "x".repeat(100))));
        let text = table.to_string();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 14 * 2 + 1, "{text}");
        assert_eq!(lines[0], "column_0   value 0");
        assert_eq!(lines[13], "column_13  value 13");
        assert_eq!(lines[14], "");
        assert!(lines[15].starts_with("column_0   xxx") && lines[15].ends_with('…'));
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{text}");
        let empty = Table::new((0..14).map(|i| Column::left(format!("column_{i}")))).fit(80);
        assert_eq!(empty.to_string(), "(no rows)");
    }

    #[test]
    fn one_column() {
        let mut table = Table::new([Column::left("ONLY")]);
        table.row(["x"]);
        assert_eq!(table.to_string(), "ONLY\nx");
        let mut table = Table::new([Column::right("N")]);
        table.row(["10"]);
        assert_eq!(table.to_string(), " N\n10");
    }
}
