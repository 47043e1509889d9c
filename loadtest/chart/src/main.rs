//! `bench-chart <result.json> <out.png>`: draws the proxy benchmark chart from the JSON result
//! that `loadtest/run.sh` writes to `loadtest/results/`.
//!
//! Left panel: requests per CPU-second for every target that reports it, with the ratio to
//! nginx. Right panel: p50 and p99 latency for every target. Text is rendered by ab_glyph from a
//! TTF read at run time (`BENCH_CHART_FONT`, else a few common DejaVu/Liberation paths).

use std::error::Error;
use std::path::Path;
use std::process::ExitCode;
use std::{env, fs};

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Deserialize;

const SIZE: (u32, u32) = (1200, 500);
const FONT: &str = "sans-serif";
const FONT_ENV: &str = "BENCH_CHART_FONT";
/// Tried in order when `BENCH_CHART_FONT` is not set (Debian/Ubuntu, Fedora, Arch, Liberation).
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
const CPU_COLOR: RGBColor = RGBColor(66, 133, 180);
const P50_COLOR: RGBColor = RGBColor(90, 160, 90);
const P99_COLOR: RGBColor = RGBColor(220, 120, 50);

/// The fields of the result file the chart uses; the others (errors, rss_kib, rps) are ignored.
#[derive(Debug, Deserialize)]
struct Report {
    date: String,
    commit: String,
    rounds: u64,
    duration: String,
    connections: u64,
    payload: u64,
    targets: Vec<Target>,
}

#[derive(Debug, Deserialize)]
struct Target {
    target: String,
    /// `null` for targets whose CPU time is not measured (the upstream alone).
    req_per_cpu_s: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
}

type DrawResult = Result<(), Box<dyn Error>>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: bench-chart <result.json> <out.png>");
        return ExitCode::from(2);
    };
    let result = read_report(Path::new(input)).and_then(|report| {
        load_font()?;
        draw(&report, Path::new(output)).map_err(|e| format!("cannot draw {output}: {e}"))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("bench-chart: {message}");
            ExitCode::FAILURE
        }
    }
}

fn read_report(path: &Path) -> Result<Report, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_report(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a result file and rejects one without targets (nothing to draw).
fn parse_report(text: &str) -> Result<Report, String> {
    let report: Report =
        serde_json::from_str(text).map_err(|e| format!("not a benchmark result: {e}"))?;
    if report.targets.is_empty() {
        return Err("the result has no targets".into());
    }
    Ok(report)
}

/// Reads the TTF and registers it as plotters' "sans-serif" (the only family the chart uses).
fn load_font() -> Result<(), String> {
    let (path, bytes) = match env::var_os(FONT_ENV) {
        Some(path) => {
            let bytes = fs::read(&path).map_err(|e| {
                format!(
                    "cannot read font {} (from {FONT_ENV}): {e}",
                    Path::new(&path).display()
                )
            })?;
            (path.to_string_lossy().into_owned(), bytes)
        }
        None => FONT_PATHS
            .iter()
            .find_map(|p| fs::read(p).ok().map(|bytes| (p.to_string(), bytes)))
            .ok_or_else(|| {
                format!(
                    "no font found: set {FONT_ENV} to a TTF file or install the Debian package \
                     fonts-dejavu-core (looked in {})",
                    FONT_PATHS.join(", ")
                )
            })?,
    };
    // plotters keeps the font for the life of the process, so the bytes are leaked on purpose.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FONT, FontStyle::Normal, bytes)
        .map_err(|_| format!("{path} is not a TrueType/OpenType font"))
}

/// The name shown under a target's bars.
fn display_name(target: &str) -> &str {
    match target {
        "direct" => "upstream directly",
        "nginx" => "nginx proxy_pass",
        "gateway" => "sandbox-gateway",
        "gateway_log" => "gateway + access log",
        "gateway_full" => "gateway, full path",
        "gateway_kube" => "gateway, Kubernetes",
        "reference" => "reference ingress",
        other => other,
    }
}

fn draw(report: &Report, out: &Path) -> DrawResult {
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let r = report;
    let title = format!(
        "Proxy benchmark {}, commit {}: {} x {} rounds, {} connections, {}-byte payload",
        r.date, r.commit, r.rounds, r.duration, r.connections, r.payload
    );
    let body = root.titled(&title, (FONT, 22))?;
    let (left, right) = body.split_horizontally(SIZE.0 / 2);
    draw_cpu(&left, report)?;
    draw_latency(&right, report)?;
    root.present()?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type CategoryChart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Left panel: requests per CPU-second, value and ratio to nginx above each bar.
fn draw_cpu(area: &Area, report: &Report) -> DrawResult {
    let bars: Vec<(&str, f64)> = report
        .targets
        .iter()
        .filter_map(|t| Some((display_name(&t.target), t.req_per_cpu_s?)))
        .collect();
    let nginx = report
        .targets
        .iter()
        .find(|t| t.target == "nginx")
        .and_then(|t| t.req_per_cpu_s);
    let caption = match nginx {
        Some(_) => "Requests per CPU-second (ratio to nginx)",
        None => "Requests per CPU-second",
    };
    let names: Vec<&str> = bars.iter().map(|b| b.0).collect();
    let top = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.25;
    let mut chart = category_chart(area, caption, &names, top, &|v| format!("{v:.0}"))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, &(_, v))| {
        Rectangle::new(
            [(i as f64 + 0.2, 0.0), (i as f64 + 0.8, v)],
            CPU_COLOR.filled(),
        )
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, &(_, v))| {
        let ratio = nginx.map(|n| format!("{:.2}x", v / n)).unwrap_or_default();
        let above = if ratio.is_empty() { -5 } else { -22 };
        EmptyElement::at((i as f64 + 0.5, v))
            + Text::new(format!("{v:.0}"), (0, above), text_style(15, VPos::Bottom))
            + Text::new(ratio, (0, -5), text_style(14, VPos::Bottom))
    }))?;
    Ok(())
}

/// Right panel: p50 and p99 latency side by side per target, with a legend.
fn draw_latency(area: &Area, report: &Report) -> DrawResult {
    let values: Vec<[f64; 2]> = report
        .targets
        .iter()
        .map(|t| [t.p50_ms, t.p99_ms])
        .collect();
    let names: Vec<&str> = report
        .targets
        .iter()
        .map(|t| display_name(&t.target))
        .collect();
    let top = values.iter().flatten().copied().fold(0.1, f64::max) * 1.35;
    let caption = "Latency in ms (lower is better)";
    let mut chart = category_chart(area, caption, &names, top, &|v| format!("{v:.1}"))?;
    for (k, (name, color)) in [("p50", P50_COLOR), ("p99", P99_COLOR)]
        .into_iter()
        .enumerate()
    {
        // Bar k of target i spans i+0.1+0.4k .. i+0.5+0.4k.
        let x = |i: usize| i as f64 + 0.1 + 0.4 * k as f64;
        chart
            .draw_series(
                values.iter().enumerate().map(|(i, v)| {
                    Rectangle::new([(x(i), 0.0), (x(i) + 0.4, v[k])], color.filled())
                }),
            )?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(values.iter().enumerate().map(|(i, v)| {
            EmptyElement::at((x(i) + 0.2, v[k]))
                + Text::new(
                    format!("{:.2}", v[k]),
                    (0, -3),
                    text_style(12, VPos::Bottom),
                )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

/// A chart with one x unit per category (its bars lie in `i..i+1`), the y axis from 0 to `top`
/// and the category names under the axis, on two lines when long so neighbours do not collide.
fn category_chart<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    names: &[&str],
    top: f64,
    y_format: &dyn Fn(&f64) -> String,
) -> Result<CategoryChart<'a, 'b>, Box<dyn Error>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..names.len().max(1) as f64, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(6)
        .y_label_formatter(y_format)
        .y_label_style((FONT, 13))
        .light_line_style(WHITE)
        .draw()?;
    // backend_coord is in image pixels; the area draws relative to its own corner.
    let (base_x, base_y) = area.get_base_pixel();
    let slot = chart.backend_coord(&(1.0, 0.0)).0 - chart.backend_coord(&(0.0, 0.0)).0;
    let lines: Vec<Vec<&str>> = names.iter().map(|name| wrap(name)).collect();
    // The largest size at which every line fits its slot, so many targets still do not collide.
    let fits = |size| {
        lines.iter().flatten().all(|line| {
            area.estimate_text_size(line, &text_style(size, VPos::Top))
                .is_ok_and(|(w, _)| (w as i32) < slot - 6)
        })
    };
    let size = (10..=14).rev().find(|&size| fits(size)).unwrap_or(10);
    for (i, name_lines) in lines.into_iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        for (row, line) in name_lines.into_iter().enumerate() {
            let pos = (x - base_x, y - base_y + 8 + (size as i32 + 3) * row as i32);
            area.draw(&Text::new(line, pos, text_style(size, VPos::Top)))?;
        }
    }
    Ok(chart)
}

/// Splits a name longer than 12 bytes in two at the break nearest its middle: a space (dropped)
/// or just after a '-' or '_'.
fn wrap(name: &str) -> Vec<&str> {
    let breaks = name.char_indices().filter_map(|(at, c)| match c {
        ' ' => Some((at, at + 1)),
        '-' | '_' => Some((at + 1, at + 1)),
        _ => None,
    });
    let middle = name.len() / 2;
    match breaks.min_by_key(|(end, _)| end.abs_diff(middle)) {
        Some((end, start)) if name.len() > 12 => vec![&name[..end], &name[start..]],
        _ => vec![name],
    }
}

fn text_style(size: u32, vpos: VPos) -> TextStyle<'static> {
    (FONT, size)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, vpos))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"date":"2026-12-02","commit":"21b33bf","rounds":3,"duration":"10s","connections":50,"payload":128,"targets":[{"target":"direct","rps":57790.65,"req_per_cpu_s":null,"p50_ms":0.647,"p99_ms":0.795,"errors":0,"rss_kib":null},{"target":"nginx","rps":52328.27,"req_per_cpu_s":53393,"p50_ms":0.88,"p99_ms":1.48,"errors":0,"rss_kib":13228},{"target":"gateway","rps":21786.96,"req_per_cpu_s":21857,"p50_ms":2.05,"p99_ms":4.2,"errors":0,"rss_kib":26848},{"target":"gateway_log","rps":19593.51,"req_per_cpu_s":19679,"p50_ms":2.29,"p99_ms":3.85,"errors":0,"rss_kib":28656}]}"#;

    #[test]
    fn parses_the_run_sh_result() {
        let report = parse_report(EXAMPLE).unwrap();
        assert_eq!(report.targets.len(), 4);
        assert_eq!(report.targets[0].req_per_cpu_s, None);
        assert_eq!(report.targets[2].req_per_cpu_s, Some(21857.0));
        assert_eq!(
            display_name(&report.targets[3].target),
            "gateway + access log"
        );
    }

    #[test]
    fn rejects_empty_and_malformed_results() {
        let empty = EXAMPLE.replace(&EXAMPLE[EXAMPLE.find('[').unwrap()..], "[]}");
        assert!(parse_report(&empty).unwrap_err().contains("no targets"));
        assert!(parse_report("{\"date\":").is_err());
    }

    #[test]
    fn draws_a_png() {
        if let Err(e) = load_font() {
            println!("skipped: {e}");
            return;
        }
        let out = env::temp_dir().join(format!("bench-chart-test-{}.png", std::process::id()));
        draw(&parse_report(EXAMPLE).unwrap(), &out).unwrap();
        let png = fs::read(&out).unwrap();
        let _ = fs::remove_file(&out);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
