//! The loss curve as a PNG: training loss per step (blue) and validation loss
//! (orange, with dots), on axes labelled with the step range and loss range.
//! Drawn on a pixel buffer and written with the `png` crate; the few labels
//! use a built-in 3x5 digit font.

use std::io::BufWriter;
use std::path::Path;

use anyhow::Context;

const W: usize = 800;
const H: usize = 480;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 20;
const BOTTOM: usize = 50;
const BLUE: [u8; 3] = [31, 119, 180];
const ORANGE: [u8; 3] = [255, 127, 14];
const GREY: [u8; 3] = [90, 90, 90];

/// 3x5 glyphs for `0-9 . - e`, one row per 3 bits.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => return None,
    })
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }

    fn dot(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()) * 2.0).ceil().max(1.0) as usize;
        for k in 0..=n {
            let t = k as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            // Two pixels thick.
            self.dot(x.round() as i64, y.round() as i64, c);
            self.dot(x.round() as i64, y.round() as i64 + 1, c);
        }
    }

    fn text(&mut self, s: &str, x: usize, y: usize, scale: usize) {
        let mut cx = x;
        for ch in s.chars() {
            if let Some(g) = glyph(ch) {
                for (row, bits) in g.iter().enumerate() {
                    for col in 0..3 {
                        if bits & (4 >> col) != 0 {
                            for dy in 0..scale {
                                for dx in 0..scale {
                                    self.dot(
                                        (cx + col * scale + dx) as i64,
                                        (y + row * scale + dy) as i64,
                                        GREY,
                                    );
                                }
                            }
                        }
                    }
                }
            }
            cx += 4 * scale;
        }
    }
}

fn label(v: f64) -> String {
    if v.abs() >= 1e4 || (v != 0.0 && v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// Writes the curve of `train` `(step, loss)` and `eval` `(step, loss)` to `path`.
pub fn loss_png(path: &Path, train: &[(f64, f64)], eval: &[(f64, f64)]) -> anyhow::Result<()> {
    let mut c = Canvas::new();
    let all = || train.iter().chain(eval).filter(|p| p.1.is_finite());
    let (x_max, y_min, y_max) = all().fold((1.0f64, f64::MAX, f64::MIN), |a, p| {
        (a.0.max(p.0), a.1.min(p.1), a.2.max(p.1))
    });
    let (y_min, y_max) = if y_min > y_max {
        (0.0, 1.0)
    } else if y_max - y_min < 1e-9 {
        (y_min - 0.5, y_max + 0.5)
    } else {
        (y_min, y_max)
    };
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let at = |(x, y): (f64, f64)| {
        (
            LEFT as f64 + x / x_max * pw,
            TOP as f64 + (y_max - y) / (y_max - y_min) * ph,
        )
    };
    let (x0, y0) = (LEFT as f64, (H - BOTTOM) as f64);
    c.line((x0, TOP as f64), (x0, y0), GREY);
    c.line((x0, y0), ((W - RIGHT) as f64, y0), GREY);
    c.text(&label(y_max), 4, TOP, 2);
    c.text(&label(y_min), 4, H - BOTTOM - 10, 2);
    c.text("0", LEFT, H - BOTTOM + 10, 2);
    let xs = format!("{}", x_max as u64);
    c.text(&xs, W - RIGHT - xs.len() * 8, H - BOTTOM + 10, 2);
    for (series, color) in [(train, BLUE), (eval, ORANGE)] {
        let pts: Vec<(f64, f64)> = series
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&p| at(p))
            .collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], color);
        }
        if color == ORANGE {
            for &(x, y) in &pts {
                for dy in -3..=3 {
                    for dx in -3..=3 {
                        c.dot(x.round() as i64 + dx, y.round() as i64 + dy, color);
                    }
                }
            }
        }
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .with_context(|| format!("cannot write {}", path.display()))?;
    w.write_image_data(&c.px)
        .with_context(|| format!("cannot write {}", path.display()))?;
    w.finish()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_both_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train: Vec<(f64, f64)> = (1..=20).map(|s| (s as f64, 5.0 / s as f64)).collect();
        loss_png(&path, &train, &[(10.0, 0.8), (20.0, 0.5)]).unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        let has = |c: [u8; 3]| buf.chunks(3).any(|p| p == c);
        assert!(has(BLUE) && has(ORANGE) && has(GREY));
    }
}
