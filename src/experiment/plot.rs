//! PNG plots of the report (plotters, bitmap backend, text through ab_glyph).
//!
//! plotters draws text only with a registered font; peftdb uses the system's DejaVu Sans (or Liberation
//! Sans), or the TrueType file named by `PEFTDB_FONT`. Without one, plotting fails with a message saying
//! what to install (`apt-get install fonts-dejavu-core`).

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FONT: &str = "sans-serif";

const CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn font_once() -> &'static Result<PathBuf, String> {
    static FONT_PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FONT_PATH.get_or_init(|| {
        let mut paths: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("PEFTDB_FONT") {
            paths.push(PathBuf::from(p));
        }
        paths.extend(CANDIDATES.iter().map(PathBuf::from));
        for p in paths {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return Ok(p);
                }
            }
        }
        Err(format!(
            "no TrueType font found for the plots (looked for $PEFTDB_FONT and {}); install one, e.g. \
             `apt-get install fonts-dejavu-core`, or set PEFTDB_FONT to a .ttf file",
            CANDIDATES.join(", ")
        ))
    })
}

/// Make sure a font is registered; the error says what to install.
pub fn ensure_font() -> Result<&'static Path, String> {
    font_once()
        .as_ref()
        .map(|p| p.as_path())
        .map_err(|e| e.clone())
}

fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

/// Blue (negative) - white (0) - red (positive), saturating at |v| = `scale`.
fn diverging(v: f64, scale: f64) -> RGBColor {
    if !v.is_finite() {
        return RGBColor(200, 200, 200);
    }
    let x = (v / scale).clamp(-1.0, 1.0);
    let f = |a: f64| (255.0 * (1.0 - a.abs())) as u8;
    if x >= 0.0 {
        RGBColor(255, f(x), f(x))
    } else {
        RGBColor(f(x), f(x), 255)
    }
}

/// A heatmap of `values[row][col]` with the numbers written in the cells (`fmt` of each value).
pub fn heatmap(
    path: &Path,
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
    fmt: &dyn Fn(f64) -> String,
) -> Result<(), String> {
    ensure_font()?;
    let (nr, nc) = (rows.len(), cols.len());
    let cell = 58u32;
    let left = 190u32;
    let top = 60u32;
    let bottom = 170u32;
    let w = left + cell * nc as u32 + 30;
    let h = top + cell * nr as u32 + bottom;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let scale = values
        .iter()
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-9);
    root.draw(&Text::new(
        title.to_string(),
        (10, 15),
        (FONT, 20).into_font(),
    ))
    .map_err(err(path))?;
    for (r, row) in values.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let x0 = (left + cell * c as u32) as i32;
            let y0 = (top + cell * r as u32) as i32;
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell as i32, y0 + cell as i32)],
                diverging(v, scale).filled(),
            ))
            .map_err(err(path))?;
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell as i32, y0 + cell as i32)],
                RGBColor(230, 230, 230),
            ))
            .map_err(err(path))?;
            if v.is_finite() {
                root.draw(&Text::new(
                    fmt(v),
                    (x0 + 8, y0 + cell as i32 / 2 - 7),
                    (FONT, 14).into_font(),
                ))
                .map_err(err(path))?;
            }
        }
    }
    for (r, name) in rows.iter().enumerate() {
        let y = (top + cell * r as u32 + cell / 2 - 8) as i32;
        root.draw(&Text::new(name.clone(), (8, y), (FONT, 15).into_font()))
            .map_err(err(path))?;
    }
    let label_style = TextStyle::from((FONT, 15).into_font()).transform(FontTransform::Rotate90);
    for (c, name) in cols.iter().enumerate() {
        let x = (left + cell * c as u32 + cell / 2 + 8) as i32;
        let y = (top + cell * nr as u32 + 6) as i32;
        root.draw(&Text::new(name.clone(), (x, y), label_style.clone()))
            .map_err(err(path))?;
    }
    root.present().map_err(err(path))?;
    Ok(())
}

/// A horizontal bar chart: one bar per category with an optional error bar (+- err).
pub fn hbars(
    path: &Path,
    title: &str,
    x_label: &str,
    bars: &[(String, f64, Option<f64>)],
    x_range: (f64, f64),
    reference: Option<(f64, &str)>,
) -> Result<(), String> {
    ensure_font()?;
    let n = bars.len().max(1);
    let h = 90 + 30 * n as u32;
    let root = BitMapBackend::new(path, (900, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(250)
        .build_cartesian_2d(x_range.0..x_range.1, 0f64..n as f64)
        .map_err(err(path))?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(x_label)
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            let i = (*y - 0.5).round();
            if (y - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[names.len() - 1 - i as usize].clone()
            } else {
                String::new()
            }
        })
        .label_style((FONT, 14))
        .draw()
        .map_err(err(path))?;
    let color = RGBColor(70, 110, 180);
    for (k, (_, v, e)) in bars.iter().enumerate() {
        let y = (n - 1 - k) as f64;
        let x0 = x_range.0.max(0.0f64.min(x_range.1));
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x0, y + 0.15), (*v, y + 0.85)],
                color.filled(),
            )))
            .map_err(err(path))?;
        if let Some(e) = e {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(v - e, y + 0.5), (v + e, y + 0.5)],
                    BLACK.stroke_width(2),
                )))
                .map_err(err(path))?;
        }
    }
    if let Some((x, label)) = reference {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, n as f64)],
                RED.stroke_width(2),
            )))
            .map_err(err(path))?
            .label(label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err(path))?;
    }
    root.present().map_err(err(path))?;
    Ok(())
}

/// A scatter plot of `points` (x, y) with the diagonal y = x and the axes through 0.
pub fn scatter(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
) -> Result<(), String> {
    ensure_font()?;
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let lim = finite
        .iter()
        .fold(1.0f64, |m, (x, y)| m.max(x.abs()).max(y.abs()))
        * 1.1;
    let root = BitMapBackend::new(path, (700, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(-lim..lim, -lim..lim)
        .map_err(err(path))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 14))
        .draw()
        .map_err(err(path))?;
    let grey = RGBColor(150, 150, 150);
    for line in [
        vec![(-lim, -lim), (lim, lim)],
        vec![(-lim, 0.0), (lim, 0.0)],
        vec![(0.0, -lim), (0.0, lim)],
    ] {
        chart
            .draw_series(std::iter::once(PathElement::new(
                line,
                grey.stroke_width(1),
            )))
            .map_err(err(path))?;
    }
    chart
        .draw_series(
            finite
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 4, RGBColor(70, 110, 180).filled())),
        )
        .map_err(err(path))?;
    root.present().map_err(err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diverging_colors() {
        assert_eq!(diverging(0.0, 1.0), RGBColor(255, 255, 255));
        assert_eq!(diverging(1.0, 1.0), RGBColor(255, 0, 0));
        assert_eq!(diverging(-2.0, 1.0), RGBColor(0, 0, 255));
        assert_eq!(diverging(f64::NAN, 1.0), RGBColor(200, 200, 200));
    }
}
