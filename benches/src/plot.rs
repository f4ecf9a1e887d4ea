//! The bench report's plots, drawn with `plotters` (its SVG backend only).
//!
//! Why one module: `compare` (bar charts: one bar per proxy) and `soak` (time series: one line
//! per process, vertical markers for events) used to carry their own hand-written SVG, each
//! with its own axis arithmetic, colours and text layout. Here is the one owner of plotting:
//! the look (sizes, fonts, palette), the use of the library and the error handling live in one
//! place, and the scenarios only hand over their numbers, titles and units.
//!
//! Why `plotters` with `default-features = false` and only `svg_backend` + `line_series`: the
//! plots are committed SVG files read in a browser or on GitHub, so no bitmap backend, and
//! without `ttf` plotters measures text with a built-in estimate (no font-kit, no system fonts);
//! the SVG backend writes `<text>` elements and the viewer lays them out. Bars are plain
//! `Rectangle` elements, which need no feature.
//!
//! Every function renders into a string first and writes the file itself, so a failure
//! (plotters' or the file system's) comes back as a `String` naming the file.

use std::path::Path;

use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const FONT: &str = "sans-serif";
/// Line colours, in series order (the first is also the highlighted bar's).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];
/// The bars other than the highlighted one.
const MUTED: RGBColor = RGBColor(0x9a, 0xa5, 0xb1);
/// Marker colours, in group order: gray for the first group, orange for the second, ...
const MARKERS: [RGBColor; 3] = [
    RGBColor(0xb0, 0xb0, 0xb0),
    RGBColor(0xf4, 0xa4, 0x60),
    RGBColor(0x9a, 0xcd, 0x32),
];

type DrawResult<T> = Result<T, DrawingAreaErrorKind<std::io::Error>>;

/// Renders with `draw` into an SVG document of `size` and writes it to `path`; every error
/// names the file.
fn write_svg(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> DrawResult<()>,
) -> Result<(), String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        draw(&root)
            .and_then(|()| root.present())
            .map_err(|e| format!("{}: drawing the plot: {e}", path.display()))?;
    }
    std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))
}

/// A horizontal bar chart: one bar per item, top to bottom in the given order, its value and
/// `unit` written after it; the item named `highlight` gets the first palette colour, the
/// others a muted gray.
pub(crate) fn bars(
    path: &Path,
    title: &str,
    unit: &str,
    items: &[(String, f64)],
    highlight: &str,
) -> Result<(), String> {
    let rows: Vec<BarRow<'_>> = items.iter().map(|(n, v)| BarRow::Bar(n, *v)).collect();
    bar_rows(path, title, unit, &rows, highlight, 34)
}

/// One group of [`grouped_bars`]: its title and its bars (name, value).
pub(crate) type BarGroup = (String, Vec<(String, f64)>);

/// [`bars`] in groups, top to bottom: each group's title on a row of its own (bold, at the
/// left of the plot), then its bars, named on the axis; the bars named `highlight` (one per
/// group, say) in the first palette colour, the others muted. One scale for all groups, e.g.
/// CPU per request of every proxy at each of several loads.
pub(crate) fn grouped_bars(
    path: &Path,
    title: &str,
    unit: &str,
    groups: &[BarGroup],
    highlight: &str,
) -> Result<(), String> {
    let rows: Vec<BarRow<'_>> = groups
        .iter()
        .flat_map(|(g, items)| {
            std::iter::once(BarRow::Title(g)).chain(items.iter().map(|(n, v)| BarRow::Bar(n, *v)))
        })
        .collect();
    bar_rows(path, title, unit, &rows, highlight, 28)
}

/// A row of a bar chart: a bar (its name on the axis, its value), or a group's title.
enum BarRow<'a> {
    Bar(&'a str, f64),
    Title(&'a str),
}

/// The bar charts' drawing: one row per entry, top to bottom, `row_px` high each.
fn bar_rows(
    path: &Path,
    title: &str,
    unit: &str,
    rows: &[BarRow<'_>],
    highlight: &str,
    row_px: u32,
) -> Result<(), String> {
    let n = rows.len();
    let value = |v: f64| if v.is_finite() { v.max(0.0) } else { 0.0 };
    let max = rows
        .iter()
        .filter_map(|r| match r {
            BarRow::Bar(_, v) => Some(value(*v)),
            BarRow::Title(_) => None,
        })
        .fold(0.0, f64::max)
        .max(1e-9);
    let size = (640, 90 + row_px * n.max(1) as u32);
    write_svg(path, size, |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 19).into_font().style(FontStyle::Bold))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(90)
            // x: room after the longest bar for its label. y: integer ranges are inclusive
            // here, rows 0..=n-1.
            .build_cartesian_2d(0.0..max * 1.3, (0..n.max(1) - 1).into_segmented())?;
        // Row k of the chart (counted from the bottom) holds entry n-1-k, so the first entry is
        // on top. The axis labels sit in the middle of each row; titles have none there.
        let name_of = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(k) if *k < n => match rows[n - 1 - k] {
                BarRow::Bar(name, _) => name.to_string(),
                BarRow::Title(_) => String::new(),
            },
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n.max(1))
            .y_label_formatter(&name_of)
            .x_label_formatter(&tick)
            .x_desc(unit)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 15))
            // Not `max_light_lines(0)`: plotters' integer key points loop on a hint of 0.
            .x_max_light_lines(0)
            .draw()?;
        let bars = rows.iter().enumerate().filter_map(|(i, r)| match r {
            BarRow::Bar(name, v) => Some((n - 1 - i, *name, *v)),
            BarRow::Title(_) => None,
        });
        chart.draw_series(bars.clone().map(|(row, name, v)| {
            let color = if name == highlight { PALETTE[0] } else { MUTED };
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row)),
                    (value(v), SegmentValue::Exact(row + 1)),
                ],
                color.filled(),
            );
            bar.set_margin(5, 5, 0, 0);
            bar
        }))?;
        let label = TextStyle::from((FONT, 16).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        chart.draw_series(bars.map(|(row, _, v)| {
            EmptyElement::at((value(v), SegmentValue::CenterOf(row)))
                + Text::new(format!("{v:.1} {unit}"), (6, 0), label.clone())
        }))?;
        let heading = TextStyle::from((FONT, 16).into_font().style(FontStyle::Bold))
            .pos(Pos::new(HPos::Left, VPos::Center));
        chart.draw_series(rows.iter().enumerate().filter_map(|(i, r)| match r {
            BarRow::Title(t) => Some(
                EmptyElement::at((0.0, SegmentValue::CenterOf(n - 1 - i)))
                    + Text::new(t.to_string(), (4, 0), heading.clone()),
            ),
            BarRow::Bar(..) => None,
        }))?;
        Ok(())
    })
}

/// One line of a time series: its legend name and its (seconds, value) points.
pub(crate) type Series = (String, Vec<(f64, f64)>);

/// A line chart over time: x in seconds, labelled in minutes; one line per series, and for each
/// marker group (legend name, times in seconds) a thin vertical line at each time (the first
/// group gray, the second orange). The legend, right of the plot, names both.
pub(crate) fn time_series(
    path: &Path,
    title: &str,
    unit: &str,
    series: &[Series],
    markers: &[(String, Vec<f64>)],
) -> Result<(), String> {
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let x_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| finite(p.0)))
        .fold(1.0, f64::max)
        / 60.0;
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| finite(p.1)))
        .fold(0.0, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.08 } else { 1.0 };
    let marker_style = |i: usize| MARKERS[i % MARKERS.len()].mix(0.8).stroke_width(1);
    let line_style = |i: usize| PALETTE[i % PALETTE.len()].stroke_width(2);
    write_svg(path, (1000, 400), |root| {
        root.fill(&WHITE)?;
        let (left, legend) = root.split_horizontally(830);
        let mut chart = ChartBuilder::on(&left)
            .caption(title, (FONT, 19).into_font().style(FontStyle::Bold))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(unit)
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 15))
            .bold_line_style(RGBColor(0xee, 0xee, 0xee))
            .max_light_lines(0)
            .draw()?;
        for (i, (_, at)) in markers.iter().enumerate() {
            chart.draw_series(at.iter().map(|t| {
                let m = finite(*t) / 60.0;
                PathElement::new(vec![(m, 0.0), (m, y_max)], marker_style(i))
            }))?;
        }
        for (i, (_, points)) in series.iter().enumerate() {
            chart.draw_series(LineSeries::new(
                points.iter().map(|(x, y)| (finite(*x) / 60.0, finite(*y))),
                line_style(i),
            ))?;
        }
        // The legend has its own area: plotters' series labels stay inside the plotting area
        // (their coordinates are clamped to it), where they would hide the lines.
        let text = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        let row = |j: usize| 50 + 20 * j as i32;
        for (i, (name, _)) in markers.iter().enumerate() {
            let y = row(i);
            let sample = marker_style(i).stroke_width(3);
            legend.draw(&PathElement::new(vec![(4, y), (20, y)], sample))?;
            legend.draw(&Text::new(name.as_str(), (26, y), text.clone()))?;
        }
        for (i, (name, _)) in series.iter().enumerate() {
            let y = row(markers.len() + i);
            legend.draw(&Rectangle::new(
                [(6, y - 6), (18, y + 6)],
                line_style(i).filled(),
            ))?;
            legend.draw(&Text::new(name.as_str(), (26, y), text.clone()))?;
        }
        Ok(())
    })
}

/// One chart of [`panels`]: its title and its lines, (x, y) points each.
pub(crate) type Panel = (String, Vec<Series>);

/// Line charts side by side, one per panel, over the same x quantity (`x_desc`), each with its
/// own y scale from 0 (values in `unit`): one line with a dot at every point per series, the
/// same series in the same colour in every panel; the legend (the first panel's series names)
/// under the title. For a few measured points per line, e.g. latency percentiles against loss.
pub(crate) fn panels(
    path: &Path,
    title: &str,
    x_desc: &str,
    unit: &str,
    panels: &[Panel],
) -> Result<(), String> {
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let xs = || {
        panels
            .iter()
            .flat_map(|p| p.1.iter().flat_map(|s| s.1.iter().map(|q| finite(q.0))))
    };
    let x_min = xs().fold(f64::INFINITY, f64::min);
    let x_max = xs().fold(f64::NEG_INFINITY, f64::max);
    let (x_min, x_max) = match x_min < x_max {
        true => (x_min, x_max),
        false if x_min.is_finite() => (x_min - 1.0, x_min + 1.0),
        false => (0.0, 1.0),
    };
    let pad = (x_max - x_min) * 0.06;
    let n = panels.len().max(1);
    let line_style = |i: usize| PALETTE[i % PALETTE.len()].stroke_width(2);
    write_svg(path, (40 + 330 * n as u32, 420), |root| {
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 19).into_font().style(FontStyle::Bold))?;
        let (legend, charts) = body.split_vertically(30);
        let text = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        let names = panels.first().map(|p| p.1.as_slice()).unwrap_or_default();
        for (i, (name, _)) in names.iter().enumerate() {
            let x = 60 + 160 * i as i32;
            legend.draw(&Rectangle::new(
                [(x, 9), (x + 12, 21)],
                line_style(i).filled(),
            ))?;
            legend.draw(&Text::new(name.as_str(), (x + 18, 15), text.clone()))?;
        }
        for (area, (name, series)) in charts.split_evenly((1, n)).iter().zip(panels) {
            let y_max = series
                .iter()
                .flat_map(|s| s.1.iter().map(|p| finite(p.1)))
                .fold(0.0, f64::max);
            let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
            let mut chart = ChartBuilder::on(area)
                .caption(name, (FONT, 16))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(55)
                .build_cartesian_2d(x_min - pad..x_max + pad, 0.0..y_max)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(unit)
                .x_label_formatter(&tick)
                .y_label_formatter(&tick)
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 14))
                .bold_line_style(RGBColor(0xee, 0xee, 0xee))
                .max_light_lines(0)
                .draw()?;
            for (i, (_, points)) in series.iter().enumerate() {
                let points: Vec<(f64, f64)> = points
                    .iter()
                    .map(|(x, y)| (finite(*x), finite(*y)))
                    .collect();
                chart.draw_series(LineSeries::new(points.clone(), line_style(i)))?;
                chart.draw_series(
                    points
                        .iter()
                        .map(|p| Circle::new(*p, 4, PALETTE[i % PALETTE.len()].filled())),
                )?;
            }
        }
        Ok(())
    })
}

/// An axis label: the value without trailing zeros (plotters' own format prints "10.0").
fn tick(v: &f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("remora-bench-plot-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Checks that `svg` is one `<svg>` element whose tags all nest and close (a small XML
    /// well-formedness check: no dependency on an XML parser for a test), and returns it.
    pub(crate) fn well_formed(svg: &str) -> &str {
        assert!(
            svg.starts_with("<svg"),
            "does not start with <svg: {svg:.80}"
        );
        assert!(
            svg.trim_end().ends_with("</svg>"),
            "does not end with </svg>"
        );
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("unterminated tag") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "`<` inside a tag: {tag}");
            let name = |t: &str| t.split_whitespace().next().unwrap_or("").to_string();
            if let Some(closing) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(closing.trim()), "mismatched </{closing}>");
            } else if !tag.ends_with('/') {
                open.push(&tag[..name(tag).len()]);
            }
            assert!(
                open.len() <= 1 || open[0] == "svg",
                "element outside <svg>: {tag}"
            );
            rest = &rest[end + 1..];
            if open.is_empty() {
                assert!(rest.trim().is_empty(), "content after </svg>");
            }
        }
        assert!(open.is_empty(), "unclosed: {open:?}");
        svg
    }

    /// The `<polyline>` elements' point counts.
    pub(crate) fn polylines(svg: &str) -> Vec<usize> {
        svg.split("<polyline")
            .skip(1)
            .map(|p| {
                let pts = p.split("points=\"").nth(1).unwrap_or("");
                pts[..pts.find('"').unwrap_or(0)].split_whitespace().count()
            })
            .collect()
    }

    #[test]
    fn bars_draw_one_bar_and_label_per_item() {
        let dir = TempDir::new("bars");
        let path = dir.0.join("bars.svg");
        let items = vec![
            ("remora".to_string(), 11.1),
            ("Envoy".to_string(), 36.9),
            ("a < b & c".to_string(), 0.0),
        ];
        bars(
            &path,
            "CPU per request (lower is better)",
            "µs",
            &items,
            "remora",
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let svg = well_formed(&svg);
        assert!(svg.contains("CPU per request (lower is better)"));
        for label in [
            "remora",
            "Envoy",
            "a &lt; b &amp; c",
            "11.1 µs",
            "36.9 µs",
            "0.0 µs",
        ] {
            assert!(
                svg.contains(&format!("{label}\n</text>")),
                "no label {label}"
            );
        }
        assert!(svg.contains(">\nµs\n</text>"), "no axis unit");
        // One filled rect per bar: one in the highlight colour, the others muted.
        assert_eq!(svg.matches(r##"fill="#1F77B4""##).count(), 1);
        assert_eq!(svg.matches(r##"fill="#9AA5B1""##).count(), 2);
    }

    #[test]
    fn grouped_bars_draw_a_title_per_group_and_a_bar_per_item() {
        let dir = TempDir::new("grouped");
        let path = dir.0.join("grouped.svg");
        let group = |t: &str, a: f64, b: f64| -> BarGroup {
            (
                t.to_string(),
                vec![("remora".to_string(), a), ("haproxy".to_string(), b)],
            )
        };
        let groups = vec![
            group("h2c, 1 connection", 60.0, 50.0),
            group("gRPC, 10 connections", 70.5, 55.25),
        ];
        grouped_bars(&path, "CPU at 1k rps", "µs", &groups, "remora").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let svg = well_formed(&svg);
        for label in [
            "CPU at 1k rps",
            "h2c, 1 connection",
            "gRPC, 10 connections",
            "60.0 µs",
            "50.0 µs",
            "70.5 µs",
            "55.2 µs",
        ] {
            assert!(
                svg.contains(&format!("{label}\n</text>")),
                "no label {label}"
            );
        }
        // The group titles are bold; one highlighted and one muted bar per group.
        assert_eq!(svg.matches("font-weight=\"bold\"").count(), 1 + 2);
        assert_eq!(svg.matches(r##"fill="#1F77B4""##).count(), 2);
        assert_eq!(svg.matches(r##"fill="#9AA5B1""##).count(), 2);
        assert_eq!(svg.matches(">\nremora\n</text>").count(), 2);
    }

    #[test]
    fn bars_of_zeros_and_non_finite_values_still_render() {
        let dir = TempDir::new("bars-zero");
        let path = dir.0.join("zero.svg");
        let items = vec![("remora".to_string(), 0.0), ("x".to_string(), f64::NAN)];
        bars(&path, "zeros", "MiB", &items, "remora").unwrap();
        well_formed(&std::fs::read_to_string(&path).unwrap());
    }

    #[test]
    fn bars_with_no_items_still_render() {
        let dir = TempDir::new("bars-empty");
        let path = dir.0.join("empty.svg");
        bars(&path, "nothing measured", "rps", &[], "remora").unwrap();
        well_formed(&std::fs::read_to_string(&path).unwrap());
    }

    #[test]
    fn time_series_draw_one_line_per_series_with_every_point() {
        let dir = TempDir::new("lines");
        let path = dir.0.join("lines.svg");
        let series = vec![
            (
                "client".to_string(),
                (1..=90)
                    .map(|t| (t as f64, 9.5 + t as f64 / 100.0))
                    .collect(),
            ),
            (
                "server s1".to_string(),
                (1..=90).map(|t| (t as f64, 9.0)).collect(),
            ),
        ];
        let markers = vec![
            ("endpoint change".to_string(), vec![30.0, 60.0]),
            ("certificate rotation".to_string(), vec![45.0]),
        ];
        time_series(&path, "RSS per process", "MiB", &series, &markers).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let svg = well_formed(&svg);
        for text in [
            "RSS per process",
            "client",
            "server s1",
            "endpoint change",
            "certificate rotation",
            "minutes",
            "MiB",
        ] {
            assert!(svg.contains(&format!("{text}\n</text>")), "no text {text}");
        }
        // Each series is one polyline with one coordinate per point (the other polylines are
        // the axes, the grid, the markers and the legend's marker samples).
        let lines = polylines(svg);
        assert_eq!(lines.iter().filter(|n| **n == 90).count(), 2, "{lines:?}");
        // The marker lines (2 + 1) and one legend sample per group, in the marker colours.
        assert_eq!(svg.matches(r##"stroke="#B0B0B0""##).count(), 2 + 1);
        assert_eq!(svg.matches(r##"stroke="#F4A460""##).count(), 1 + 1);
    }

    #[test]
    fn panels_draw_every_series_in_every_panel() {
        let dir = TempDir::new("panels");
        let path = dir.0.join("panels.svg");
        let line = |name: &str, ys: [f64; 3]| -> Series {
            (
                name.to_string(),
                vec![(0.0, ys[0]), (1.0, ys[1]), (3.0, ys[2])],
            )
        };
        let panels_in: Vec<Panel> = ["p50", "p99", "p99.9"]
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let k = k as f64;
                (
                    name.to_string(),
                    vec![
                        line("TCP + mTLS", [10.0 + k, 20.0 + k, 200.0 + k]),
                        line("QUIC", [10.0 + k, 15.0 + k, 30.0 + k]),
                    ],
                )
            })
            .collect();
        panels(&path, "latency against loss", "loss %", "ms", &panels_in).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let svg = well_formed(&svg);
        for text in [
            "latency against loss",
            "p50",
            "p99",
            "p99.9",
            "TCP + mTLS",
            "QUIC",
            "loss %",
        ] {
            assert!(svg.contains(&format!("{text}\n</text>")), "no text {text}");
        }
        // One 3-point line per series and panel, one dot per point.
        let lines = polylines(svg);
        assert_eq!(lines.iter().filter(|n| **n == 3).count(), 6, "{lines:?}");
        assert_eq!(svg.matches("<circle").count(), 18);
    }

    #[test]
    fn panels_with_no_points_still_render() {
        let dir = TempDir::new("panels-empty");
        let path = dir.0.join("empty.svg");
        panels(&path, "nothing", "loss %", "ms", &[]).unwrap();
        panels(
            &path,
            "one",
            "loss %",
            "ms",
            &[("p50".into(), vec![("a".into(), vec![(1.0, 2.0)])])],
        )
        .unwrap();
        well_formed(&std::fs::read_to_string(&path).unwrap());
    }

    #[test]
    fn time_series_with_no_points_still_render() {
        let dir = TempDir::new("lines-empty");
        let path = dir.0.join("empty.svg");
        time_series(&path, "nothing", "ms", &[("p50".into(), vec![])], &[]).unwrap();
        well_formed(&std::fs::read_to_string(&path).unwrap());
    }

    #[test]
    fn errors_name_the_file() {
        let path = Path::new("/nonexistent-dir-for-remora-bench/plot.svg");
        let err = bars(path, "t", "u", &[("a".into(), 1.0)], "a").unwrap_err();
        assert!(
            err.contains("/nonexistent-dir-for-remora-bench/plot.svg"),
            "{err}"
        );
        let err = time_series(path, "t", "u", &[], &[]).unwrap_err();
        assert!(
            err.contains("/nonexistent-dir-for-remora-bench/plot.svg"),
            "{err}"
        );
    }
}
