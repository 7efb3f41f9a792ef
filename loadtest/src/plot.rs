//! Latency-by-percentile curves (the HdrHistogram picture) as SVG.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// One curve: a label, a colour index and a µs histogram.
pub struct Curve<'a> {
    /// Legend text.
    pub label: String,
    /// 0 = A, 1 = B, …
    pub series: usize,
    /// The data.
    pub histogram: &'a Histogram<u64>,
    /// Drawn thicker (the merged curve).
    pub bold: bool,
}

/// x is log10(1/(1-p)): 0 → 0 %, 1 → 90 %, 2 → 99 %, …
const X_MAX: f64 = 4.0;

fn percentile_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    if p < 99.0 {
        format!("{p:.0}%")
    } else {
        let s = format!("{p:.3}");
        format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Write every curve into one SVG chart.
pub fn latency_by_percentile(path: &Path, title: &str, curves: &[Curve<'_>]) -> anyhow::Result<()> {
    let y_max = curves
        .iter()
        .map(|c| c.histogram.value_at_quantile(0.9999) as f64 / 1000.0)
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.1;
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..X_MAX, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(5)
        .x_label_formatter(&percentile_label)
        .draw()?;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ];
    for c in curves {
        let color = palette[c.series % palette.len()];
        let style = if c.bold {
            color.stroke_width(3)
        } else {
            color.mix(0.35).stroke_width(1)
        };
        let points: Vec<(f64, f64)> = (0..=400)
            .map(|k| {
                let x = X_MAX * f64::from(k) / 400.0;
                let q = (1.0 - 10f64.powf(-x)).min(0.99999);
                (x, c.histogram.value_at_quantile(q) as f64 / 1000.0)
            })
            .collect();
        let series = chart.draw_series(LineSeries::new(points, style))?;
        if c.bold {
            series.label(c.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
