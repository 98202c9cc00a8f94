//! PNG charts, log-log (N on x), median with min–max bars. Text is drawn with an embedded
//! DejaVu Sans through plotters' ab_glyph renderer, so no system fonts are needed.

use std::{path::Path, sync::OnceLock};

use anyhow::{Result, anyhow};
use plotters::{
    coord::ranged1d::{AsRangedCoord, ValueFormatter},
    prelude::*,
};

use crate::stats::Summary;

const SIZE: (u32, u32) = (960, 600);
const FONT: &str = "sans-serif";

/// One point: a median with its range at x; `lower_bound` draws it hollow (an estimate
/// that the real value exceeds).
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub x: f64,
    pub y: Summary,
    pub lower_bound: bool,
}

pub struct Series {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<Point>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series>,
}

pub const RED: RGBColor = RGBColor(204, 37, 41);
pub const ORANGE: RGBColor = RGBColor(230, 140, 20);
pub const BLUE: RGBColor = RGBColor(31, 90, 200);
pub const GREEN: RGBColor = RGBColor(40, 150, 60);
pub const PURPLE: RGBColor = RGBColor(130, 60, 170);
pub const BROWN: RGBColor = RGBColor(140, 90, 50);
pub const GREY: RGBColor = RGBColor(90, 90, 90);
pub const TEAL: RGBColor = RGBColor(20, 140, 150);

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if !ok {
        return Err(anyhow!("the embedded DejaVu Sans font is not a valid font"));
    }
    Ok(())
}

/// Powers of ten around `[lo, hi]`.
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    (10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)))
}

/// The y axis: whole decades (log) when the data spans one or more, else (linear) a margin of
/// a fifth around it, so values within a few percent of each other (stream throughput) stay
/// apart.
fn y_range(lo: f64, hi: f64) -> (f64, f64) {
    if hi / lo >= 10.0 { decades(lo, hi) } else { (lo / 1.2, hi * 1.2) }
}

/// 1, 10, 100, 1k, 10k, 100k, 1M; 0.5, 0.05 …
pub fn short_number(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

impl Chart<'_> {
    pub fn draw(&self, file: &Path) -> Result<()> {
        register_font()?;
        let points = || self.series.iter().flat_map(|s| &s.points);
        let (xmin, xmax) = points().fold((f64::INFINITY, 0.0f64), |(a, b), p| (a.min(p.x), b.max(p.x)));
        let (ymin, ymax) = points().fold((f64::INFINITY, 0.0f64), |(a, b), p| (a.min(p.y.min), b.max(p.y.max)));
        // Log axes: every value must be positive and finite.
        if !(xmin > 0.0 && xmin <= xmax && xmax.is_finite() && ymin > 0.0 && ymin <= ymax && ymax.is_finite()) {
            return Err(anyhow!("chart {:?}: no positive data to draw", self.title));
        }
        let (x0, x1) = decades(xmin, xmax);
        let (y0, y1) = y_range(ymin, ymax);
        if ymax / ymin >= 10.0 {
            self.draw_on(file, (x0..x1 * 1.2).log_scale(), (y0..y1).log_scale())
        } else {
            // Less than a decade: a linear axis, whose ticks are labelled.
            self.draw_on(file, (x0..x1 * 1.2).log_scale(), y0..y1)
        }
    }

    fn draw_on<X, Y>(&self, file: &Path, x: X, y: Y) -> Result<()>
    where
        X: AsRangedCoord<Value = f64>,
        Y: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let root = BitMapBackend::new(file, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, (FONT, 22))
            .margin(16)
            .x_label_area_size(52)
            .y_label_area_size(78)
            .build_cartesian_2d(x, y)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .x_label_formatter(&|v| short_number(*v))
            .y_label_formatter(&|v| short_number(*v))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(err)?;
        for s in &self.series {
            let color = s.color;
            let line = s.points.iter().map(|p| (p.x, p.y.median));
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(err)?
                .label(&s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
            chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|p| ErrorBar::new_vertical(p.x, p.y.min, p.y.median, p.y.max, color.stroke_width(1), 8)),
                )
                .map_err(err)?;
            chart
                .draw_series(s.points.iter().map(|p| {
                    let style = if p.lower_bound { color.stroke_width(2) } else { color.filled() };
                    Circle::new((p.x, p.y.median), 5, style)
                }))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(GREY)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
        Ok(())
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_decades() {
        assert_eq!(short_number(1.0), "1");
        assert_eq!(short_number(10_000.0), "10k");
        assert_eq!(short_number(100_000.0), "100k");
        assert_eq!(short_number(0.05), "0.05");
        assert_eq!(short_number(2_500_000.0), "2.5M");
        assert_eq!(decades(3.0, 250.0), (1.0, 1000.0));
        assert_eq!(decades(10.0, 10.0), (10.0, 100.0));
        assert_eq!(y_range(3.0, 250.0), (1.0, 1000.0));
        let (lo, hi) = y_range(12.0, 15.0);
        assert!((lo - 10.0).abs() < 1e-9 && (hi - 18.0).abs() < 1e-9, "{lo}..{hi}");
    }

    #[test]
    fn draws_a_png() {
        let dir = std::env::temp_dir().join(format!("bench-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.png");
        let s = |m: f64| Summary { median: m, min: m * 0.9, max: m * 1.1, count: 3 };
        let chart = Chart {
            title: "test",
            x_label: "N",
            y_label: "ms",
            series: vec![Series {
                name: "a".into(),
                color: RED,
                points: vec![
                    Point { x: 1.0, y: s(1.0), lower_bound: false },
                    Point { x: 1e4, y: s(50.0), lower_bound: true },
                ],
            }],
        };
        chart.draw(&file).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();
        let empty = Chart { title: "e", x_label: "", y_label: "", series: vec![] };
        assert!(empty.draw(&dir.join("e.png")).is_err());
    }
}
