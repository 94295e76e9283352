//! PNG charts of a scenario's results, written beside its JSON (`run.json` -> `run.png`): what
//! the report holds over time (throughput, the watched process's RSS and open files) and its
//! latency percentiles, one panel each, stacked.
//!
//! Text is drawn with an embedded font (DejaVu Sans, `assets/`), so rendering needs no system
//! font library and looks the same on every machine.
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, Context};
use plotters::prelude::*;

use crate::report::Latency;
use crate::sys::UsageSample;

/// DejaVu Sans (Bitstream Vera licence, `assets/DejaVuSans-LICENSE.txt`): plotters' `ab_glyph`
/// text backend only draws fonts registered with it.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Pixels: wide enough for a minute of per-second points to stay apart.
const WIDTH: u32 = 1000;
/// Pixels per panel: room for the axis labels and a readable plot.
const PANEL_HEIGHT: u32 = 300;
/// Pixels above the panels for the chart's title.
const TITLE_HEIGHT: u32 = 40;

/// The percentiles a percentile panel shows, left to right.
const PERCENTILES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

/// One scenario's chart: a title and panels stacked top to bottom.
#[derive(Debug, Clone, Default)]
pub struct Chart {
    /// Above every panel: the scenario and its parameters.
    pub title: String,
    /// The panels, top to bottom.
    pub panels: Vec<Panel>,
}

/// One panel of a [`Chart`].
#[derive(Debug, Clone)]
pub enum Panel {
    /// Values over time: each series is `(seconds, value)` points.
    Time {
        /// The panel's caption.
        title: String,
        /// What the x axis counts from, e.g. `seconds of the measured window`.
        x_label: String,
        /// The unit of the values, e.g. `MiB/s`.
        y_label: String,
        /// The lines.
        series: Vec<Series>,
    },
    /// Latency percentiles (p50 to max, log scale), one line per group (e.g. per step).
    Percentiles {
        /// The panel's caption.
        title: String,
        /// `(name, percentiles)` per line.
        groups: Vec<(String, Latency)>,
    },
}

/// A named line of a [`Panel::Time`].
#[derive(Debug, Clone)]
pub struct Series {
    /// The legend's entry.
    pub name: String,
    /// `(seconds, value)`.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series of one value per second, the first at second 1 (the end of its second).
    pub fn per_second(name: &str, values: impl IntoIterator<Item = f64>) -> Self {
        Self {
            name: name.into(),
            points: values
                .into_iter()
                .enumerate()
                .map(|(i, v)| ((i + 1) as f64, v))
                .collect(),
        }
    }
}

impl Panel {
    fn is_empty(&self) -> bool {
        match self {
            Panel::Time { series, .. } => series.iter().all(|s| s.points.is_empty()),
            Panel::Percentiles { groups, .. } => groups.is_empty(),
        }
    }
}

impl Chart {
    /// A chart titled `title` with no panel yet.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            panels: Vec::new(),
        }
    }

    /// Adds `panel` unless it has nothing to draw.
    pub fn push(&mut self, panel: Panel) {
        if !panel.is_empty() {
            self.panels.push(panel);
        }
    }

    /// Draws the chart as a PNG at `path`; fails when there is nothing to draw.
    pub fn render(&self, path: &Path) -> anyhow::Result<()> {
        if self.panels.is_empty() {
            anyhow::bail!("nothing to chart");
        }
        register_font();
        let height = TITLE_HEIGHT + PANEL_HEIGHT * self.panels.len() as u32;
        let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (top, body) = root.split_vertically(TITLE_HEIGHT);
        top.titled(&self.title, ("sans-serif", 20))
            .map_err(draw_err)?;
        for (panel, area) in self
            .panels
            .iter()
            .zip(body.split_evenly((self.panels.len(), 1)))
        {
            match panel {
                Panel::Time {
                    title,
                    x_label,
                    y_label,
                    series,
                } => draw_time(&area, title, x_label, y_label, series)?,
                Panel::Percentiles { title, groups } => draw_percentiles(&area, title, groups)?,
            }
        }
        root.present().map_err(draw_err)?;
        Ok(())
    }

    /// Draws the chart beside the JSON file `json` (same name, `.png`) and returns its path.
    pub fn write_beside(&self, json: &Path) -> anyhow::Result<PathBuf> {
        let png = json.with_extension("png");
        self.render(&png)
            .with_context(|| format!("cannot draw {}", png.display()))?;
        Ok(png)
    }
}

/// Writes `chart` beside `json`, saying where on stderr; a chart that cannot be drawn is a
/// warning, never the run's failure (the JSON is the result).
pub fn write_beside_or_warn(chart: &Chart, json: &Path) {
    match chart.write_beside(json) {
        Ok(png) => eprintln!("wrote {}", png.display()),
        Err(e) => eprintln!("warning: no chart: {e:#}"),
    }
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The font is compiled in and parsed by a test: it cannot be invalid here.
            let _ = plotters::style::register_font("sans-serif", style, FONT);
        }
    });
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotters: {e:?}")
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_time(
    area: &Area<'_>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let x_min = points().map(|p| p.0).fold(x_max, f64::min).min(0.0);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max);
    // Head room above the highest point; a flat zero line still gets an axis.
    let y_top = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, 0.0..y_top)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc(x_label)
        .y_desc(y_label)
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if s.points.len() <= 60 {
            chart
                .draw_series(PointSeries::of_element(
                    s.points.iter().copied(),
                    3,
                    color.filled(),
                    &|c, size, style| EmptyElement::at(c) + Circle::new((0, 0), size, style),
                ))
                .map_err(draw_err)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

fn draw_percentiles(
    area: &Area<'_>,
    title: &str,
    groups: &[(String, Latency)],
) -> anyhow::Result<()> {
    let values = |l: &Latency| [l.p50, l.p90, l.p99, l.p999, l.max].map(|v| v.max(1) as f64);
    let all: Vec<f64> = groups.iter().flat_map(|(_, l)| values(l)).collect();
    let lo = all.iter().copied().fold(f64::MAX, f64::min) / 2.0;
    let hi = all.iter().copied().fold(1.0, f64::max) * 2.0;
    let last = (PERCENTILES.len() - 1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..last + 0.5, (lo.max(0.5)..hi).log_scale())
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(PERCENTILES.len() * 4)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && (0.0..=last).contains(&i) {
                PERCENTILES[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("microseconds (log)")
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(draw_err)?;
    for (i, (name, l)) in groups.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = values(l)
            .into_iter()
            .enumerate()
            .map(|(x, y)| (x as f64, y))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(PointSeries::of_element(
                pts,
                4,
                color.filled(),
                &|c, size, style| EmptyElement::at(c) + Circle::new((0, 0), size, style),
            ))
            .map_err(draw_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// `1.5k`, `12M`, `3G`: axis labels that fit.
fn short(v: f64) -> String {
    let a = v.abs();
    let (x, unit) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    if x.fract().abs() < 1e-9 || x.abs() >= 100.0 {
        format!("{x:.0}{unit}")
    } else {
        format!("{x:.1}{unit}")
    }
}

/// The watched process's RSS (MiB) and open files over the run, as two panels.
pub fn usage_panels(samples: &[UsageSample], who: &str) -> [Panel; 2] {
    let series = |f: fn(&UsageSample) -> f64| {
        vec![Series {
            name: who.into(),
            points: samples.iter().map(|s| (s.t, f(s))).collect(),
        }]
    };
    let x_label = "seconds since the start (setup included)";
    [
        Panel::Time {
            title: format!("RSS of the {who}"),
            x_label: x_label.into(),
            y_label: "MiB".into(),
            series: series(|s| mib(s.rss_bytes as f64)),
        },
        Panel::Time {
            title: format!("open files of the {who}"),
            x_label: x_label.into(),
            y_label: "fds".into(),
            series: series(|s| s.fds as f64),
        },
    ]
}

/// Bytes per second as MiB/s, per value.
pub fn mib(v: f64) -> f64 {
    v / (1u64 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(base: u64) -> Latency {
        Latency {
            p50: base,
            p90: base * 2,
            p99: base * 5,
            p999: base * 20,
            max: base * 50,
            mean: base as f64 * 1.5,
        }
    }

    #[test]
    fn renders_a_png() {
        let mut chart = Chart::new("throughput (test)");
        chart.push(Panel::Time {
            title: "throughput".into(),
            x_label: "seconds".into(),
            y_label: "MiB/s".into(),
            series: vec![Series::per_second(
                "both directions",
                [900.0, 1000.0, 950.0, 1010.0],
            )],
        });
        chart.push(Panel::Percentiles {
            title: "latency".into(),
            groups: vec![("cycle".into(), latency(100)), ("pair".into(), latency(30))],
        });
        // An empty panel is left out rather than drawn as a blank axis.
        chart.push(Panel::Time {
            title: "nothing".into(),
            x_label: "s".into(),
            y_label: "x".into(),
            series: vec![Series::per_second("none", [])],
        });
        assert_eq!(chart.panels.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("run.json");
        let png = chart.write_beside(&json).unwrap();
        assert_eq!(png, dir.path().join("run.png"));
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert!(bytes.len() > 10_000, "only {} bytes", bytes.len());
    }

    #[test]
    fn font_parses() {
        assert!(plotters::style::register_font("test", FontStyle::Normal, FONT).is_ok());
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Chart::new("empty")
            .render(&dir.path().join("x.png"))
            .is_err());
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(short(0.0), "0");
        assert_eq!(short(1500.0), "1.5k");
        assert_eq!(short(2_000_000.0), "2M");
        assert_eq!(short(250.0), "250");
    }
}
