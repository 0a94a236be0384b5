//! The PNG chart of a compare run: one bar per case, the median ratio imstate / Redis, with a
//! line at 1.0 (parity). Drawn with plotters' bitmap backend; text is rendered by ab_glyph from
//! a TrueType file read at run time, so no system font library is linked.

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::compare::CaseSummary;

/// Draws `summaries` as a bar chart into `path`.
pub fn draw(path: &Path, font: &Path, summaries: &[CaseSummary]) -> anyhow::Result<()> {
    let bytes = std::fs::read(font).with_context(|| {
        format!(
            "reading the chart font {} (set --chart-font)",
            font.display()
        )
    })?;
    // plotters keeps registered fonts for the whole process; one chart per run, so leaking
    // the few hundred KB of the font is the simplest correct lifetime.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", font.display()))?;
    let error = |error: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {error:?}", path.display());

    let width = 200 + 190 * summaries.len() as u32;
    let root = BitMapBackend::new(path, (width.max(800), 600)).into_drawing_area();
    root.fill(&WHITE).map_err(error)?;
    let top = summaries
        .iter()
        .map(|s| s.ratio_median)
        .fold(1.0_f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "imstate / Redis, median ratio per workload (higher = imstate faster)",
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(60)
        // A segmented range a..b has b - a + 1 segments: one per case.
        .build_cartesian_2d(
            (0..summaries.len().saturating_sub(1)).into_segmented(),
            0.0..top,
        )
        .map_err(error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("ratio imstate / Redis")
        .x_labels(summaries.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(index) => summaries
                .get(*index)
                .map(|s| s.case.clone())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(error)?;
    chart
        .draw_series(summaries.iter().enumerate().map(|(index, s)| {
            let color = if s.ratio_median >= 1.0 {
                RGBColor(46, 139, 87)
            } else {
                RGBColor(200, 70, 60)
            };
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(index), 0.0),
                    (SegmentValue::Exact(index + 1), s.ratio_median),
                ],
                color.filled(),
            );
            bar.set_margin(0, 0, 15, 15);
            bar
        }))
        .map_err(error)?;
    chart
        .draw_series(summaries.iter().enumerate().map(|(index, s)| {
            Text::new(
                format!("{:.2}x", s.ratio_median),
                (SegmentValue::CenterOf(index), s.ratio_median + top * 0.02),
                ("sans-serif", 16).into_font(),
            )
        }))
        .map_err(error)?;
    chart
        .draw_series(LineSeries::new(
            [(SegmentValue::Exact(0), 1.0), (SegmentValue::Last, 1.0)],
            BLACK.stroke_width(2),
        ))
        .map_err(error)?;
    root.present().map_err(error)?;
    Ok(())
}
