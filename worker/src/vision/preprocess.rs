//! Image preprocessing for the two vision models and for scene detection.
//!
//! - SigLIP: what Hugging Face's `SiglipImageProcessor` does: a PIL bicubic resize to a square (no crop,
//!   aspect not kept) to an 8-bit image, rescale by 1/255, normalise with mean/std, NCHW f32.
//!   The resize is Pillow's own algorithm ([`pillow_bicubic`]: a = −0.5, support scaled by the
//!   downscale factor, 22-bit fixed-point coefficients, horizontal pass then vertical, 8-bit rounding
//!   in between). `fast_image_resize`'s `CatmullRom` was tried first and differs from Pillow by up to
//!   5 levels on 17 % of the values of a test photo (different fixed-point scheme), so it is used only
//!   where bit-parity does not matter (letterbox, thumbnails).
//! - YuNet: letterbox (top-left, black padding) to the model's fixed square, BGR, 0–255, NCHW f32.
//! - Scenes: a small grey thumbnail whose mean absolute difference measures how much the picture changed.
//!
//! The resize to 8 bits runs on a blocking thread per frame; the conversion to f32 runs on the model
//! thread straight into the batch tensor, so a frame in flight costs its 8-bit pixels only.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

/// Width of the scene-detection thumbnail; its height follows the aspect ratio.
pub const THUMB_WIDTH: u32 = 64;

/// Why an image could not be resized (a size of zero; never expected from the frame reader).
#[derive(Debug, thiserror::Error)]
#[error("resize {from:?} -> {to:?}: {message}")]
pub struct ResizeError {
    from: (u32, u32),
    to: (u32, u32),
    message: String,
}

/// Resizes `rgb` (row-major rgb24) to `to` with `alg`.
fn resize(rgb: &[u8], from: (u32, u32), to: (u32, u32), alg: ResizeAlg) -> Result<Vec<u8>, ResizeError> {
    let err = |message: String| ResizeError { from, to, message };
    if from == to {
        return Ok(rgb.to_vec());
    }
    let src = ImageRef::new(from.0, from.1, rgb, PixelType::U8x3).map_err(|e| err(e.to_string()))?;
    let mut dst = Image::new(to.0, to.1, PixelType::U8x3);
    Resizer::new().resize(&src, &mut dst, &ResizeOptions::new().resize_alg(alg)).map_err(|e| err(e.to_string()))?;
    Ok(dst.into_vec())
}

/// The 8-bit `size`×`size` image SigLIP sees: a PIL-bicubic resize of the frame.
///
/// # Errors
/// A zero-sized input.
pub fn siglip_pixels(rgb: &[u8], width: u32, height: u32, size: u32) -> Result<Vec<u8>, ResizeError> {
    let (from, to) = ((width, height), (size, size));
    if width == 0 || height == 0 || size == 0 || rgb.len() != width as usize * height as usize * 3 {
        return Err(ResizeError { from, to, message: format!("{} bytes for an empty or mismatched image", rgb.len()) });
    }
    Ok(pillow_bicubic(rgb, width as usize, height as usize, size as usize, size as usize))
}

/// Fixed-point precision of Pillow's 8-bit resampling (`PRECISION_BITS` in `Resample.c`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = −0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index and fixed-point weights (Pillow's `precompute_coeffs` and
/// `normalize_coeffs_8bpc`).
fn pillow_coeffs(input: usize, output: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = input as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..output)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64).max(xmin as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) / filterscale)).collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total == 0.0 { *w } else { w / total } * f64::from(1u32 << PRECISION_BITS);
                    (if w < 0.0 { w - 0.5 } else { w + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// Rounds a fixed-point sum to 8 bits as Pillow's `clip8` does.
fn clip8(sum: i64) -> u8 {
    ((sum + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes rgb24 `src` (`w`×`h`) to `ow`×`oh` exactly as Pillow's `Image.resize(..., BICUBIC)` does
/// on an 8-bit RGB image: horizontal pass, 8-bit intermediate, vertical pass; a pass whose size does
/// not change is skipped.
pub fn pillow_bicubic(src: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let horizontal = if ow == w {
        src.to_vec()
    } else {
        let coeffs = pillow_coeffs(w, ow);
        let mut out = vec![0u8; ow * h * 3];
        for (row_in, row_out) in src.chunks_exact(w * 3).zip(out.chunks_exact_mut(ow * 3)) {
            for ((xmin, k), px) in coeffs.iter().zip(row_out.chunks_exact_mut(3)) {
                let mut sum = [0i64; 3];
                for (i, &k) in k.iter().enumerate() {
                    let p = &row_in[(xmin + i) * 3..(xmin + i) * 3 + 3];
                    for c in 0..3 {
                        sum[c] += i64::from(p[c]) * i64::from(k);
                    }
                }
                for c in 0..3 {
                    px[c] = clip8(sum[c]);
                }
            }
        }
        out
    };
    if oh == h {
        return horizontal;
    }
    let coeffs = pillow_coeffs(h, oh);
    let stride = ow * 3;
    let mut out = vec![0u8; oh * stride];
    let mut sums = vec![0i64; stride];
    for ((ymin, k), row_out) in coeffs.iter().zip(out.chunks_exact_mut(stride)) {
        sums.fill(0);
        for (i, &k) in k.iter().enumerate() {
            let row = &horizontal[(ymin + i) * stride..(ymin + i + 1) * stride];
            for (s, &p) in sums.iter_mut().zip(row) {
                *s += i64::from(p) * i64::from(k);
            }
        }
        for (o, &s) in row_out.iter_mut().zip(&sums) {
            *o = clip8(s);
        }
    }
    out
}

/// Writes `pixels` (rgb24, `size`×`size`) into `out` as normalised CHW f32: `(v/255 − mean)/std`.
pub fn siglip_chw(pixels: &[u8], mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = pixels.len() / 3;
    for (i, px) in pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) / 255.0 - mean[c]) / std[c];
        }
    }
}

/// Where a frame lands in the letterboxed tensor: the scale from frame to tensor pixels, the scaled
/// size (the frame sits at the top-left corner) and the tensor's size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Letterbox {
    pub scale: f32,
    pub width: u32,
    pub height: u32,
    pub tensor_width: u32,
    pub tensor_height: u32,
}

impl Letterbox {
    /// The letterbox of a `width`×`height` frame scaled to a long side of `side`, in a tensor whose
    /// sides are the scaled sides rounded up to a multiple of `multiple` (`side` itself for a square).
    pub fn new(width: u32, height: u32, side: u32, multiple: u32) -> Self {
        let scale = side as f32 / width.max(height) as f32;
        let w = ((width as f32 * scale).round() as u32).clamp(1, side);
        let h = ((height as f32 * scale).round() as u32).clamp(1, side);
        let up = |n: u32| n.div_ceil(multiple.max(1)) * multiple.max(1);
        Self { scale, width: w, height: h, tensor_width: up(w), tensor_height: up(h) }
    }
}

/// Writes the letterboxed frame into `out` (resized to `3·tensor_width·tensor_height` f32, BGR planes,
/// 0–255, zero padding); see [`Letterbox::new`] for `side` and `multiple`.
///
/// # Errors
/// A zero-sized input.
pub fn letterbox_bgr(rgb: &[u8], width: u32, height: u32, side: u32, multiple: u32, out: &mut Vec<f32>) -> Result<Letterbox, ResizeError> {
    let lb = Letterbox::new(width, height, side, multiple);
    let scaled = resize(rgb, (width, height), (lb.width, lb.height), ResizeAlg::Convolution(FilterType::Bilinear))?;
    let (w, tw) = (lb.width as usize, lb.tensor_width as usize);
    let plane = tw * lb.tensor_height as usize;
    out.clear();
    out.resize(3 * plane, 0.0);
    for (y, row) in scaled.chunks_exact(w * 3).enumerate() {
        for (x, px) in row.chunks_exact(3).enumerate() {
            let at = y * tw + x;
            out[at] = f32::from(px[2]);
            out[plane + at] = f32::from(px[1]);
            out[2 * plane + at] = f32::from(px[0]);
        }
    }
    Ok(lb)
}

/// A grey thumbnail (luma 0–1, [`THUMB_WIDTH`] wide) for frame differencing. Area-averaged, so noise
/// and compression artefacts average out while a cut changes most cells.
///
/// # Errors
/// A zero-sized input.
pub fn grey_thumbnail(rgb: &[u8], width: u32, height: u32) -> Result<Vec<f32>, ResizeError> {
    let tw = THUMB_WIDTH.min(width);
    let th = ((u64::from(height) * u64::from(tw)) / u64::from(width)).max(1) as u32;
    let small = resize(rgb, (width, height), (tw, th), ResizeAlg::Convolution(FilterType::Box))?;
    Ok(small.chunks_exact(3).map(|p| (0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2])) / 255.0).collect())
}

/// Mean absolute difference of two thumbnails of the same size (0 = identical, 1 = black vs white).
pub fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.is_empty() || a.len() != b.len() {
        return 1.0;
    }
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_keeps_aspect_at_top_left() {
        let lb = Letterbox::new(1280, 720, 640, 640);
        assert_eq!((lb.width, lb.height, lb.tensor_width, lb.tensor_height), (640, 360, 640, 640));
        assert!((lb.scale - 0.5).abs() < 1e-6);
        let lb = Letterbox::new(1280, 720, 640, 32);
        assert_eq!((lb.tensor_width, lb.tensor_height), (640, 384));
        let rgb = [200u8, 100, 50].repeat(4 * 2);
        let mut out = vec![1.0f32; 7];
        let lb = letterbox_bgr(&rgb, 4, 2, 8, 8, &mut out).unwrap();
        assert_eq!((lb.width, lb.height), (8, 4));
        assert_eq!(out.len(), 3 * 8 * 8);
        // B plane first, then G, then R; padding rows are zero.
        assert_eq!((out[0], out[64], out[128]), (50.0, 100.0, 200.0));
        assert_eq!(out[5 * 8], 0.0);
        // Padded to a multiple of 3: a 9×6 tensor, rows of 9.
        let lb = letterbox_bgr(&rgb, 4, 2, 8, 3, &mut out).unwrap();
        assert_eq!((lb.tensor_width, lb.tensor_height, out.len()), (9, 6, 3 * 9 * 6));
        assert_eq!((out[7], out[8], out[9]), (50.0, 0.0, 50.0));
    }

    #[test]
    fn siglip_normalisation_maps_to_minus_one_one() {
        let mut out = [0.0; 6];
        siglip_chw(&[0, 255, 51, 0, 255, 51], [0.5; 3], [0.5; 3], &mut out);
        assert_eq!(out[0], -1.0);
        assert_eq!(out[2], 1.0);
        assert!((out[4] - (0.2 - 0.5) / 0.5).abs() < 1e-6);
    }

    #[test]
    fn thumbnails_differ_on_cuts_only() {
        let black = vec![0u8; 128 * 72 * 3];
        let white = vec![255u8; 128 * 72 * 3];
        let (a, b) = (grey_thumbnail(&black, 128, 72).unwrap(), grey_thumbnail(&white, 128, 72).unwrap());
        assert_eq!(a.len(), 64 * 36);
        assert!((mean_abs_diff(&a, &b) - 1.0).abs() < 1e-3);
        assert_eq!(mean_abs_diff(&a, &a), 0.0);
    }
}
