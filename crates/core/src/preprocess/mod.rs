//! Uploaded images into model input rows: decode (format sniffed, header checked before any
//! pixel is decoded, EXIF orientation applied), resize with a SIMD resizer, centre crop,
//! normalize, lay out. Runs on the bounded [`Pool`], never on the async workers.

mod png_decode;
mod pool;

use std::io::Cursor;

use fast_image_resize as fr;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use thiserror::Error;

use crate::config::{ChannelOrder, ImageConfig, ImageDtype, Interpolation, Layout};
use crate::tensor::{DataType, Tensor};

pub(crate) use pool::{finished, Pool, Priority};

/// Why an image was refused. `TooLarge` answers 413, the rest 400.
#[derive(Debug, Error, PartialEq)]
pub enum PreprocessError {
    #[error("the image is empty")]
    Empty,
    #[error("not an image in a supported format (JPEG, PNG, WebP, GIF, BMP)")]
    NotAnImage,
    #[error("{0}")]
    TooLarge(String),
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
}

/// An image whose header has been read: its decoder (none for a PNG, which `png_decode.rs` decodes)
/// and its dimensions.
struct Opened<'a> {
    decoder: Option<Box<dyn ImageDecoder + 'a>>,
    width: u32,
    height: u32,
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// A PNG's dimensions from its IHDR chunk alone: the image crate's decoder reads (and
/// inflates) every chunk before the pixels, an ICC profile bomb included.
fn png_dimensions(bytes: &[u8]) -> Result<(u32, u32), PreprocessError> {
    let mut d = png::Decoder::new(Cursor::new(bytes));
    d.set_ignore_iccp_chunk(true);
    d.set_ignore_text_chunk(true);
    let info = d
        .read_header_info()
        .map_err(|e| PreprocessError::Corrupt(e.to_string()))?;
    Ok((info.width, info.height))
}

/// Opens one image and reads its header, refusing oversize files and dimensions before any pixel
/// is decoded.
fn open<'a>(bytes: &'a [u8], cfg: &ImageConfig) -> Result<Opened<'a>, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() as u64 > cfg.max_image_bytes.0 {
        return Err(PreprocessError::TooLarge(format!(
            "the image has {} bytes; the limit is {}",
            bytes.len(),
            cfg.max_image_bytes.0
        )));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Corrupt(e.to_string()))?;
    match reader.format() {
        None => return Err(PreprocessError::NotAnImage),
        // The JPEG decoder fills a cut-off scan with grey instead of failing; a whole JPEG ends
        // with the end-of-image marker (some writers pad a few bytes after it).
        Some(image::ImageFormat::Jpeg) if !ends_like_jpeg(bytes) => {
            return Err(PreprocessError::Corrupt(
                "the JPEG is truncated (no end-of-image marker)".into(),
            ))
        }
        Some(_) => {}
    }
    let (decoder, (w, h)) = if bytes.starts_with(PNG_SIGNATURE) {
        (None, png_dimensions(bytes)?)
    } else {
        let d = reader
            .into_decoder()
            .map_err(|e| PreprocessError::Corrupt(e.to_string()))?;
        let dims = d.dimensions();
        (Some(Box::new(d) as Box<dyn ImageDecoder + 'a>), dims)
    };
    let pixels = u64::from(w) * u64::from(h);
    if pixels > cfg.max_pixels {
        return Err(PreprocessError::TooLarge(format!(
            "the image declares {w} × {h} = {pixels} pixels; the limit is {}",
            cfg.max_pixels
        )));
    }
    if pixels == 0 {
        return Err(PreprocessError::Empty);
    }
    Ok(Opened {
        decoder,
        width: w,
        height: h,
    })
}

/// Checks a request's images from their headers alone, before any is decoded: each within the
/// per-image limits and all of them together within `max_request_pixels`. Returns the index of
/// the image that fails and why.
pub(crate) fn check_request<B: AsRef<[u8]>>(
    images: &[B],
    cfg: &ImageConfig,
) -> Result<(), (usize, PreprocessError)> {
    let mut total = 0u64;
    for (i, bytes) in images.iter().enumerate() {
        let image = open(bytes.as_ref(), cfg).map_err(|e| (i, e))?;
        total += u64::from(image.width) * u64::from(image.height);
        if total > cfg.max_request_pixels {
            return Err((
                i,
                PreprocessError::TooLarge(format!(
                    "the request's images together have more than max_request_pixels ({}) pixels",
                    cfg.max_request_pixels
                )),
            ));
        }
    }
    Ok(())
}

/// A decoded image in the pixel format it was stored in, its EXIF orientation not yet applied:
/// both are applied after resizing, to the small frame, so a big image is held once.
#[derive(Debug)]
pub(crate) struct Decoded {
    img: DynamicImage,
    orientation: Orientation,
}

impl Decoded {
    /// Whether the orientation swaps width and height.
    fn turned(&self) -> bool {
        matches!(
            self.orientation,
            Orientation::Rotate90
                | Orientation::Rotate270
                | Orientation::Rotate90FlipH
                | Orientation::Rotate270FlipH
        )
    }

    /// Width and height as displayed.
    pub(crate) fn dimensions(&self) -> (u32, u32) {
        let (w, h) = (self.img.width(), self.img.height());
        if self.turned() {
            (h, w)
        } else {
            (w, h)
        }
    }
}

/// How much a `w × h` image may be reduced while it is decoded (by box averaging, see
/// `png_decode.rs`) and still be at least twice the size the resize makes of it.
fn reduction(w: u32, h: u32, cfg: &ImageConfig) -> u32 {
    let [out_h, out_w] = cfg.size;
    let target = cfg.resize_shorter.unwrap_or(out_h.max(out_w)).max(1);
    (w.min(h) / target.saturating_mul(2)).clamp(1, 256)
}

/// Decodes one image, refusing oversize files and headers before decoding pixels. A PNG's
/// decoder holds at most its 8-bit frame (see `png_decode.rs`); other formats' decoders may allocate
/// their frame (at most 4 bytes a pixel in the formats served) and as much again for working
/// memory (a progressive JPEG keeps every coefficient), plus 16 MiB.
pub(crate) fn decode(bytes: &[u8], cfg: &ImageConfig) -> Result<Decoded, PreprocessError> {
    let opened = open(bytes, cfg)?;
    let (w, h) = (opened.width, opened.height);
    let Some(mut decoder) = opened.decoder else {
        let (img, orientation) = png_decode::decode(bytes, (w, h), reduction(w, h, cfg))?;
        return Ok(Decoded { img, orientation });
    };
    let pixels = u64::from(w) * u64::from(h);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(16 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| PreprocessError::TooLarge(e.to_string()))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| PreprocessError::Corrupt(e.to_string()))?;
    let img =
        DynamicImage::from_decoder(decoder).map_err(|e| PreprocessError::Corrupt(e.to_string()))?;
    Ok(Decoded { img, orientation })
}

/// Whether the end-of-image marker (FF D9) is in the last 1 KiB of a JPEG.
fn ends_like_jpeg(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

fn algorithm(i: Interpolation) -> fr::ResizeAlg {
    match i {
        Interpolation::Nearest => fr::ResizeAlg::Nearest,
        Interpolation::Bilinear => fr::ResizeAlg::Convolution(fr::FilterType::Bilinear),
        Interpolation::Bicubic => fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom),
        Interpolation::Lanczos3 => fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3),
    }
}

/// Resizes (shorter side then centre crop, or straight to size) to `cfg.size`, in the image's
/// own 8-bit pixel format (other formats are converted to RGB first), then orients the small
/// frame and converts it to RGB. Resizing commutes with rotating and flipping, so only the
/// resize's output, never the decoded frame, is copied.
pub(crate) fn resize(decoded: Decoded, cfg: &ImageConfig) -> Result<RgbImage, PreprocessError> {
    let [out_h, out_w] = cfg.size;
    let (w, h) = decoded.dimensions();
    let (rw, rh) = match cfg.resize_shorter {
        // Shorter side to `s`, rounded like torchvision and PIL-based pipelines.
        Some(s) if w <= h => (
            s,
            ((h as f64 * s as f64 / w as f64).round() as u32).max(out_h),
        ),
        Some(s) => (
            ((w as f64 * s as f64 / h as f64).round() as u32).max(out_w),
            s,
        ),
        None => (out_w, out_h),
    };
    // A thin strip has few pixels to decode, but scaling its shorter side up makes the long side
    // huge (1 × 100,000 at 256 is 19.6 GB): the resized frame is held to the same limit.
    let resized = u64::from(rw) * u64::from(rh);
    if resized > cfg.max_pixels {
        return Err(PreprocessError::TooLarge(format!(
            "the image is {w} × {h}; resized to {rw} × {rh} = {resized} pixels it would exceed max_pixels ({})",
            cfg.max_pixels
        )));
    }
    let (sw, sh) = if decoded.turned() { (rh, rw) } else { (rw, rh) };
    let corrupt = |e: &dyn std::fmt::Display| PreprocessError::Corrupt(format!("resize: {e}"));
    let (iw, ih) = (decoded.img.width(), decoded.img.height());
    let (pixel, raw) = match decoded.img {
        DynamicImage::ImageLuma8(b) => (fr::PixelType::U8, b.into_raw()),
        DynamicImage::ImageLumaA8(b) => (fr::PixelType::U8x2, b.into_raw()),
        DynamicImage::ImageRgb8(b) => (fr::PixelType::U8x3, b.into_raw()),
        DynamicImage::ImageRgba8(b) => (fr::PixelType::U8x4, b.into_raw()),
        other => (fr::PixelType::U8x3, other.into_rgb8().into_raw()),
    };
    let src = fr::images::Image::from_vec_u8(iw, ih, raw, pixel).map_err(|e| corrupt(&e))?;
    let mut dst = fr::images::Image::new(sw, sh, pixel);
    // Alpha is dropped afterwards, as converting to RGB first would: no premultiplying.
    let options = fr::ResizeOptions::new()
        .resize_alg(algorithm(cfg.interpolation))
        .use_alpha(false);
    fr::Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| corrupt(&e))?;
    drop(src);
    let small = dst.into_vec();
    let mut img = match pixel {
        fr::PixelType::U8 => image::GrayImage::from_raw(sw, sh, small).map(DynamicImage::from),
        fr::PixelType::U8x2 => {
            image::GrayAlphaImage::from_raw(sw, sh, small).map(DynamicImage::from)
        }
        fr::PixelType::U8x4 => image::RgbaImage::from_raw(sw, sh, small).map(DynamicImage::from),
        _ => RgbImage::from_raw(sw, sh, small).map(DynamicImage::from),
    }
    .ok_or_else(|| corrupt(&"the resized frame has the wrong size"))?;
    img.apply_orientation(decoded.orientation);
    let resized = img.into_rgb8();
    if (rw, rh) == (out_w, out_h) {
        return Ok(resized);
    }
    let (left, top) = ((rw - out_w) / 2, (rh - out_h) / 2);
    Ok(image::imageops::crop_imm(&resized, left, top, out_w, out_h).to_image())
}

/// One `[1, 3, h, w]` (or `[1, h, w, 3]`) row from a resized image.
pub(crate) fn to_tensor(img: &RgbImage, cfg: &ImageConfig) -> Tensor {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let order: [usize; 3] = match cfg.channel_order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    let shape = match cfg.layout {
        Layout::Nchw => vec![1, 3, h, w],
        Layout::Nhwc => vec![1, h, w, 3],
    };
    let index = |c: usize, y: usize, x: usize| match cfg.layout {
        Layout::Nchw => (c * h + y) * w + x,
        Layout::Nhwc => (y * w + x) * 3 + c,
    };
    let raw = img.as_raw();
    match cfg.dtype {
        ImageDtype::Uint8 => {
            let mut data = vec![0u8; 3 * h * w];
            for y in 0..h {
                for x in 0..w {
                    for (c, &src) in order.iter().enumerate() {
                        data[index(c, y, x)] = raw[(y * w + x) * 3 + src];
                    }
                }
            }
            Tensor {
                dtype: DataType::U8,
                shape,
                data: data.into(),
            }
        }
        ImageDtype::Fp32 => {
            let mut values = vec![0f32; 3 * h * w];
            for y in 0..h {
                for x in 0..w {
                    for (c, &src) in order.iter().enumerate() {
                        let p = f32::from(raw[(y * w + x) * 3 + src]);
                        values[index(c, y, x)] = (p - cfg.mean[c]) / cfg.std[c];
                    }
                }
            }
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Tensor {
                dtype: DataType::F32,
                shape,
                data,
            }
        }
    }
}

/// Decode, resize, normalize: one image into one model input row.
pub fn preprocess(bytes: &[u8], cfg: &ImageConfig) -> Result<Tensor, PreprocessError> {
    let img = resize(decode(bytes, cfg)?, cfg)?;
    Ok(to_tensor(&img, cfg))
}

#[cfg(test)]
mod tests;
