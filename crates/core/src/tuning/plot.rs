//! The tuning plot: served rows/s, served batch time and memory against batch size, one line per
//! device, as SVG.

use plotters::prelude::*;

use super::{DeviceTuning, Outcome};

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws the three panels for every (model, device) result into an SVG document.
pub fn svg(results: &[(String, DeviceTuning)]) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (900, 1000)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let panels = root.split_evenly((3, 1));
        type Value = fn(&super::Probe) -> f64;
        let metrics: [(&str, Value); 3] = [
            ("rows per second, as served", |p| p.served_rows_per_second),
            ("median batch time as served (ms)", |p| p.served_ms),
            ("memory in use (MiB)", |p| {
                p.memory_used_bytes as f64 / (1024.0 * 1024.0)
            }),
        ];
        for (panel, (title, value)) in panels.iter().zip(metrics) {
            let points: Vec<(String, Vec<(f64, f64)>)> = results
                .iter()
                .map(|(model, t)| {
                    let mut ps: Vec<(f64, f64)> = t
                        .probes
                        .iter()
                        .filter(|p| p.outcome == Outcome::Ok && value(p) > 0.0)
                        .map(|p| ((p.batch as f64).log2(), value(p)))
                        .collect();
                    ps.sort_by(|a, b| a.0.total_cmp(&b.0));
                    (format!("{model} {} (chosen {})", t.device, t.chosen), ps)
                })
                .collect();
            let x_max = points
                .iter()
                .flat_map(|(_, p)| p.iter().map(|q| q.0))
                .fold(1.0, f64::max);
            let ys = || {
                points
                    .iter()
                    .flat_map(|(_, p)| p.iter().map(|q| q.1))
                    .filter(|y| *y > 0.0)
            };
            // Log scale: models and devices differ by orders of magnitude.
            let y_max = ys().fold(1e-9, f64::max) * 1.5;
            let y_min = ys().fold(y_max, f64::min) / 1.5;
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("batch size")
                .x_label_formatter(&|x| format!("{}", 2f64.powf(*x).round()))
                .draw()
                .map_err(|e| e.to_string())?;
            for (i, (label, ps)) in points.into_iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(ps.clone(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(ps.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| e.to_string())?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}
