//! The picture of a run: an SVG with four charts over the run's seconds, drawn with plotters:
//! throughput (arrivals scheduled and achieved, SMS on handsets, users verified), users in
//! flight, the time to SMS (where a lagging carrier shows), and the start request's 99th
//! percentile latency per second.

use std::path::Path;

use plotters::prelude::*;

use crate::rehearsal::report::Report;

/// Draws `report` as an SVG at `path`.
pub fn draw(report: &Report, path: &Path) -> Result<(), String> {
    let timeline = &report.timeline;
    let seconds = timeline.len().max(1) as f64;
    let root = SVGBackend::new(path, (1000, 1150)).into_drawing_area();
    root.fill(&WHITE).map_err(|error| error.to_string())?;
    let title = format!(
        "{} — {} users, {}x compression, {}",
        report.scenario.name,
        report.counts.get("arrived").copied().unwrap_or(0),
        report.scenario.time_compression,
        report.result
    );
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(|error| error.to_string())?;
    let panels = root.split_evenly((4, 1));

    let per_second = |pick: fn(&crate::rehearsal::measure::Second) -> u64| -> Vec<(f64, f64)> {
        timeline
            .iter()
            .map(|second| (second.second as f64, pick(second) as f64))
            .collect()
    };
    let throughput = [
        ("arrivals scheduled /s", per_second(|s| s.scheduled), BLACK),
        ("arrivals started /s", per_second(|s| s.arrived), BLUE),
        ("SMS on handsets /s", per_second(|s| s.sms), GREEN),
        ("verified /s", per_second(|s| s.verified), MAGENTA),
    ];
    line_chart(&panels[0], "throughput (per second)", seconds, &throughput)?;
    let in_flight = [("users in flight", per_second(|s| s.in_flight), RED)];
    line_chart(&panels[1], "users in flight", seconds, &in_flight)?;
    let latency: Vec<(f64, f64)> = timeline
        .iter()
        .filter_map(|second| Some((second.second as f64, second.start_p99_ms?)))
        .collect();
    let latency = [("p99 of POST /v1/verifications (ms)", latency, BLUE)];
    let to_sms: Vec<(f64, f64)> = timeline
        .iter()
        .filter_map(|second| Some((second.second as f64, second.time_to_sms_p99_ms? / 1000.0)))
        .collect();
    let to_sms = [("p99 of the SMS reaching handsets (s)", to_sms, GREEN)];
    line_chart(
        &panels[2],
        "time to SMS, 99th percentile per second (s)",
        seconds,
        &to_sms,
    )?;
    line_chart(
        &panels[3],
        "start latency, 99th percentile per second (ms)",
        seconds,
        &latency,
    )?;
    root.present().map_err(|error| error.to_string())
}

/// A named line of `(second, value)` points in a colour.
type Line<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

fn line_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    seconds: f64,
    series: &[Line<'_>],
) -> Result<(), String> {
    let top = series
        .iter()
        .flat_map(|(_, points, _)| points.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..seconds, 0.0..top)
        .map_err(|error| error.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds into the run")
        .draw()
        .map_err(|error| error.to_string())?;
    for (name, points, color) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|error| error.to_string())?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|error| error.to_string())
}
