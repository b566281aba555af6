//! Writes a [`Report`]: `report.json`, `BENCHMARKS.md` (tables, targets,
//! plots inline) and the PNG plots (plotters, bitmap backend).
//!
//! Text in plots needs a TrueType font: plotters' `ab_glyph` backend is pure
//! Rust but ships no font, so the first of [`FONT_CANDIDATES`] (or what
//! `fc-match` names) is loaded at run time. Without one the plots are left
//! out and `BENCHMARKS.md` says why; the numbers are all in the tables.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{Bar, Plot, Report, ScenarioReport, Series};

/// Fonts tried for plot text, in order (Debian's fonts-dejavu-core first).
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Plot size in pixels: readable on GitHub at full width.
const PLOT_SIZE: (u32, u32) = (960, 540);

/// Width of a label character at 14 px, roughly: how many fit under a bar.
const LABEL_CHAR_PX: usize = 8;

/// Lines of a bar's label at most, and their height in pixels.
const LABEL_LINES: usize = 3;
const LABEL_LINE_PX: u32 = 17;

/// Series colours, in order.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// Reads a report written by [`write`] and writes its views again into
/// `out`: `BENCHMARKS.md` and the bar plots, redrawn with this renderer.
/// report.json itself is left as the run wrote it (parsing and printing
/// floats again could change their last digits).
pub fn rerender(report_json: &Path, out: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read(report_json).with_context(|| format!("reading {}", report_json.display()))?;
    let report: Report = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a faultline-bench report", report_json.display()))?;
    std::fs::create_dir_all(out)?;
    write_views(&report, out)
}

/// Writes every file of `report` into `out`.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<()> {
    // Compact: raw latency samples make a pretty-printed file megabytes long.
    let json = serde_json::to_string(report)?;
    let path = out.join("report.json");
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    write_views(report, out)
}

/// Writes the plots and `BENCHMARKS.md` of `report` into `out`.
fn write_views(report: &Report, out: &Path) -> anyhow::Result<()> {
    let font = font();
    let mut plot_errors = Vec::new();
    for scenario in &report.scenarios {
        for plot in &scenario.plots {
            // A report read back from report.json has no samples for its
            // CDFs (they are in the scenario's data): keep the PNG drawn then.
            if matches!(plot, Plot::Cdf { series, .. } if series.is_empty()) {
                continue;
            }
            if let Err(why) = &font {
                plot_errors.push(format!("{}: {why}", plot_file(plot)));
                continue;
            }
            if let Err(e) = draw(plot, out) {
                plot_errors.push(format!("{}: {e:#}", plot_file(plot)));
            }
        }
    }
    let path = out.join("BENCHMARKS.md");
    std::fs::write(&path, markdown(report, &plot_errors))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Registers a font for plot text once; the error says why there is none.
fn font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let from_fc = std::process::Command::new("fc-match")
            .args(["-f", "%{file}", "sans-serif:style=Book"])
            .output()
            .ok()
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .filter(|p| p.extension().is_some_and(|e| e == "ttf"));
        let path = FONT_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .chain(from_fc)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                "no TrueType font for plot text (install fonts-dejavu-core)".to_string()
            })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // The font must live as long as plotters' registry: for the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable font", path.display()))
    })
    .clone()
}

fn plot_file(plot: &Plot) -> &str {
    match plot {
        Plot::Cdf { file, .. } | Plot::Bars { file, .. } | Plot::Lines { file, .. } => file,
    }
}

fn plot_title(plot: &Plot) -> &str {
    match plot {
        Plot::Cdf { title, .. } | Plot::Bars { title, .. } | Plot::Lines { title, .. } => title,
    }
}

fn draw(plot: &Plot, out: &Path) -> anyhow::Result<()> {
    let path = out.join(plot_file(plot));
    let root = BitMapBackend::new(&path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    match plot {
        Plot::Cdf {
            title,
            x_label,
            log_x,
            series,
            ..
        } => draw_cdf(&root, title, x_label, *log_x, series)?,
        Plot::Bars {
            title,
            y_label,
            bars,
            ..
        } => draw_bars(&root, title, y_label, bars)?,
        Plot::Lines {
            title,
            x_label,
            y_label,
            log_y,
            series,
            ..
        } => draw_lines(&root, title, x_label, y_label, *log_y, series)?,
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// The (x, fraction) steps of a CDF of `samples`, thinned to at most ~1000
/// points so that large sample sets draw fast.
fn cdf_points(samples: &[f64]) -> Vec<(f64, f64)> {
    let v: Vec<f64> = super::report::sorted(samples)
        .into_iter()
        .filter(|x| x.is_finite())
        .collect();
    let n = v.len();
    let step = n.div_ceil(1000).max(1);
    let mut points: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], (i + 1) as f64 / n as f64))
        .collect();
    if let Some(&last) = v.last() {
        points.push((last, 1.0));
    }
    points
}

fn draw_cdf(
    root: &Area<'_>,
    title: &str,
    x_label: &str,
    log_x: bool,
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    let all = series.iter().flat_map(|(_, s)| s.iter().copied());
    let (mut lo, mut hi) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    if !lo.is_finite() {
        (lo, hi) = (1.0, 10.0);
    }
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc("fraction of samples")
                .x_labels(10)
                .x_label_formatter(&|x| short(*x))
                .label_style(("sans-serif", 15))
                .draw()?;
            for (i, (label, samples)) in series.iter().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                chart
                    .draw_series(LineSeries::new(cdf_points(samples), colour.stroke_width(2)))?
                    .label(label.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font(("sans-serif", 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    if log_x {
        let lo = lo.max(1e-3) * 0.8;
        let hi = (hi * 1.25).max(lo * 10.0);
        finish!(builder.build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?);
    } else {
        let hi = if hi > lo { hi * 1.05 } else { lo + 1.0 };
        finish!(builder.build_cartesian_2d(0.0..hi, 0.0..1.0)?);
    }
    Ok(())
}

fn draw_bars(root: &Area<'_>, title: &str, y_label: &str, bars: &[Bar]) -> anyhow::Result<()> {
    let top = bars
        .iter()
        .map(|b| b.value.max.max(b.value.median))
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(LABEL_LINES as u32 * LABEL_LINE_PX + 12)
        .y_label_area_size(64)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .x_labels(n)
        // Drawn below, wrapped to the bar's width.
        .x_label_formatter(&|_| String::new())
        .label_style(("sans-serif", 14))
        .draw()?;
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let bar_px = (xs.end - xs.start) / n as i32;
    for (i, b) in bars.iter().enumerate() {
        let x = xs.start + bar_px * i as i32 + bar_px / 2;
        let lines = wrap(&b.label, (bar_px as usize / LABEL_CHAR_PX).max(4));
        for (k, line) in lines.iter().take(LABEL_LINES).enumerate() {
            root.draw(&Text::new(
                line.clone(),
                (x, ys.end + 8 + k as i32 * LABEL_LINE_PX as i32),
                ("sans-serif", 14)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
        }
    }
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let colour = COLOURS[i % COLOURS.len()];
        let mut rect = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), b.value.median),
            ],
            colour.mix(0.75).filled(),
        );
        rect.set_margin(0, 0, 14, 14);
        rect
    }))?;
    // Whiskers: min..max of the repeats.
    chart.draw_series(
        bars.iter()
            .enumerate()
            .filter(|(_, b)| b.value.n > 1)
            .map(|(i, b)| {
                PathElement::new(
                    vec![
                        (SegmentValue::CenterOf(i), b.value.min),
                        (SegmentValue::CenterOf(i), b.value.max),
                    ],
                    BLACK.stroke_width(2),
                )
            }),
    )?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        Text::new(
            format!(" {}", short(b.value.median)),
            (SegmentValue::CenterOf(i), b.value.median),
            ("sans-serif", 15)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Bottom)),
        )
    }))?;
    Ok(())
}

fn draw_lines(
    root: &Area<'_>,
    title: &str,
    x_label: &str,
    y_label: &str,
    log_y: bool,
    series: &[Series],
) -> anyhow::Result<()> {
    let points = series.iter().flat_map(|s| s.points.iter().copied());
    let (mut x0, mut x1, mut y0, mut y1) = points.fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), (x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 1.0, 10.0);
    }
    let pad = ((x1 - x0) * 0.05).max(0.01);
    let (x0, x1) = (x0 - pad, x1 + pad);
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .x_label_formatter(&|x| short(*x))
                .y_label_formatter(&|y| short(*y))
                .label_style(("sans-serif", 15))
                .draw()?;
            for (i, s) in series.iter().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                chart
                    .draw_series(LineSeries::new(s.points.clone(), colour.stroke_width(2)))?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
                    });
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font(("sans-serif", 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    if log_y {
        let lo = y0.max(1e-3) * 0.8;
        let hi = (y1 * 1.5).max(lo * 10.0);
        finish!(builder.build_cartesian_2d(x0..x1, (lo..hi).log_scale())?);
    } else {
        let hi = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
        finish!(builder.build_cartesian_2d(x0..x1, 0.0f64.min(y0)..hi)?);
    }
    Ok(())
}

/// `text` in lines of at most `width` characters, broken between words
/// (a longer word gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// An axis label: no trailing ".0", few digits.
fn short(x: f64) -> String {
    if x >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// Escapes `|` in a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn table_md(md: &mut String, title: &str, columns: &[String], rows: &[Vec<String>]) {
    if !title.is_empty() {
        let _ = writeln!(md, "**{title}**\n");
    }
    let _ = writeln!(
        md,
        "| {} |",
        columns
            .iter()
            .map(|c| cell(c))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|{}", "---|".repeat(columns.len()));
    for row in rows {
        let _ = writeln!(
            md,
            "| {} |",
            row.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
        );
    }
    md.push('\n');
}

fn scenario_md(md: &mut String, number: usize, s: &ScenarioReport, plot_errors: &[String]) {
    let _ = writeln!(md, "## {number}. {} (`{}`)\n", s.title, s.id);
    if let Some(why) = &s.skipped {
        let _ = writeln!(md, "Did not run: {why}\n");
        return;
    }
    if !s.method.is_empty() {
        let _ = writeln!(md, "{}\n", s.method);
    }
    for t in &s.tables {
        table_md(md, &t.title, &t.columns, &t.rows);
    }
    for plot in &s.plots {
        let file = plot_file(plot);
        if plot_errors.iter().any(|e| e.starts_with(file)) {
            continue;
        }
        let _ = writeln!(md, "![{}]({file})\n", plot_title(plot));
    }
    for note in &s.notes {
        let _ = writeln!(md, "- {note}");
    }
    if !s.notes.is_empty() {
        md.push('\n');
    }
    let _ = writeln!(md, "_Scenario time: {:.0} s._\n", s.duration_s);
}

/// The Markdown report.
pub fn markdown(report: &Report, plot_errors: &[String]) -> String {
    let mut md = String::new();
    let m = &report.machine;
    let _ = writeln!(md, "# faultline benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `{}` on {} ({}; {:.0} s). Baselines were measured in the same run; \
         figures are medians of repeats with (min–max) after them.\n",
        report.command,
        report.started,
        if report.quick {
            "quick run"
        } else {
            "full run"
        },
        report.duration_s
    );
    let _ = writeln!(
        md,
        "Machine: {} · {} × {} · {:.1} GiB RAM · KVM: {}\n",
        m.kernel,
        m.cpus,
        if m.cpu.is_empty() { "CPU" } else { &m.cpu },
        m.memory as f64 / f64::from(1u32 << 30),
        m.kvm.as_deref().unwrap_or("none")
    );
    let targets: Vec<Vec<String>> = report
        .scenarios
        .iter()
        .flat_map(|s| {
            s.targets.iter().map(move |t| {
                vec![
                    s.id.clone(),
                    t.name.clone(),
                    t.goal.clone(),
                    t.value.clone(),
                    if t.met { "yes" } else { "**no**" }.to_string(),
                ]
            })
        })
        .collect();
    if !targets.is_empty() {
        let _ = writeln!(md, "## Targets\n");
        let columns = ["scenario", "target", "goal", "measured", "met"].map(String::from);
        table_md(&mut md, "", &columns, &targets);
    }
    for (i, s) in report.scenarios.iter().enumerate() {
        scenario_md(&mut md, i + 1, s, plot_errors);
    }
    if !plot_errors.is_empty() {
        let _ = writeln!(md, "## Plots not drawn\n");
        for e in plot_errors {
            let _ = writeln!(md, "- {e}");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::super::report::{Summary, Table, Target};
    use super::*;

    /// Labels wrap between words to the width given.
    #[test]
    fn labels_wrap_between_words() {
        assert_eq!(
            wrap("random, faultline, working set", 12),
            ["random,", "faultline,", "working set"]
        );
        assert_eq!(wrap("a b", 10), ["a b"]);
        assert!(wrap("", 10).is_empty());
    }

    /// The CDF ends at 1.0 on the largest sample and is thinned for large inputs.
    #[test]
    fn cdf_is_monotonic_and_thinned() {
        let samples: Vec<f64> = (0..10_000).rev().map(f64::from).collect();
        let points = cdf_points(&samples);
        assert!(points.len() <= 1002);
        assert_eq!(*points.last().unwrap(), (9999.0, 1.0));
        assert!(
            points
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
    }

    /// A report renders its targets, tables and plots, draws PNGs when a font exists, and
    /// renders the same from its report.json.
    #[test]
    fn renders_markdown_and_png() {
        let scenario = ScenarioReport {
            id: "demo".into(),
            title: "Demo".into(),
            method: "How.".into(),
            tables: vec![Table {
                title: "t".into(),
                columns: vec!["a".into(), "b|c".into()],
                rows: vec![vec!["1".into(), "2".into()]],
            }],
            targets: vec![Target {
                name: "x vs y".into(),
                goal: "<= 3x".into(),
                value: "2.00x".into(),
                met: true,
            }],
            plots: vec![
                Plot::Cdf {
                    file: "demo-cdf.png".into(),
                    title: "CDF".into(),
                    x_label: "µs".into(),
                    log_x: true,
                    series: vec![
                        ("a".into(), vec![1.0, 2.0, 30.0]),
                        ("b".into(), vec![40.0, 90.0, 300.0]),
                    ],
                },
                Plot::Bars {
                    file: "demo-bars.png".into(),
                    title: "Bars".into(),
                    y_label: "GB/s".into(),
                    bars: ["a", "b", "a rather long label under a narrow bar"]
                        .iter()
                        .enumerate()
                        .map(|(i, l)| Bar {
                            label: l.to_string(),
                            value: Summary::of(&[1.0, 2.0 + i as f64, 3.0 + i as f64]),
                        })
                        .collect(),
                },
                Plot::Lines {
                    file: "demo-lines.png".into(),
                    title: "Lines".into(),
                    x_label: "fraction".into(),
                    y_label: "x".into(),
                    log_y: true,
                    series: vec![Series {
                        label: "a".into(),
                        points: vec![(0.25, 40.0), (0.5, 9.0), (1.0, 1.2)],
                    }],
                },
            ],
            ..Default::default()
        };
        let report = Report {
            command: "faultline-bench all".into(),
            quick: true,
            size: 1,
            started: "now".into(),
            duration_s: 1.0,
            machine: Default::default(),
            scenarios: vec![scenario],
        };
        let dir = tempfile::tempdir().unwrap();
        write(&report, dir.path()).unwrap();
        // Read back and written again: the same Markdown.
        let first = std::fs::read_to_string(dir.path().join("BENCHMARKS.md")).unwrap();
        rerender(&dir.path().join("report.json"), dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("BENCHMARKS.md")).unwrap();
        assert_eq!(md, first);
        assert!(
            md.contains("| demo | x vs y | <= 3x | 2.00x | yes |"),
            "{md}"
        );
        assert!(md.contains("b\\|c"));
        if font().is_ok() {
            for f in ["demo-cdf.png", "demo-bars.png", "demo-lines.png"] {
                let png = std::fs::read(dir.path().join(f)).unwrap();
                assert_eq!(&png[1..4], b"PNG");
            }
            assert!(md.contains("![CDF](demo-cdf.png)"));
        } else {
            assert!(md.contains("Plots not drawn"));
        }
    }
}
