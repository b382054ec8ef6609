//! PNG decoding with memory bounded by the frame, whatever the file's chunks claim.
//!
//! The `image` crate's PNG path decompresses iCCP and text chunks up to its allocation limit (a
//! 1 MB file inflated an ICC profile to 1 GiB), keeps 16-bit samples (8 bytes a pixel for RGBA)
//! and converts them in a second full copy. Here ancillary chunks that inflate (iCCP, zTXt,
//! iTXt, tEXt) are skipped, 16-bit samples become 8-bit row by row as they are decoded, and the
//! decoder may allocate no more than the 8-bit frame (at most 4 bytes a pixel) plus row buffers.
//! A frame much larger than what the model needs is reduced while it is decoded: each row is
//! added into `k × k` boxes, so only the reduced frame is held (as Pillow's `reducing_gap`
//! does before its resize).

use std::io::Cursor;

use image::metadata::Orientation;
use image::DynamicImage;

use super::PreprocessError;

/// Row buffers and the inflater's window, beyond the frame: a few rows of 8 bytes a pixel for
/// the widest image `max_pixels` allows, plus the zlib window.
const WORKING_BYTES: usize = 8 << 20;

/// Decodes a `w × h` PNG (dimensions already checked against the limits), reduced by `k` in
/// each direction (1: not reduced), with its EXIF orientation.
pub(super) fn decode(
    bytes: &[u8],
    (w, h): (u32, u32),
    k: u32,
) -> Result<(DynamicImage, Orientation), PreprocessError> {
    let k = k.max(1);
    let (rw, rh) = (w.div_ceil(k), h.div_ceil(k));
    // The frame as held: 4 bytes a pixel at most (RGBA after expansion to 8 bits), or the
    // reduced frame's sums (4 channels of u32).
    let frame = if k == 1 {
        4 * u64::from(w) * u64::from(h)
    } else {
        16 * u64::from(rw) * u64::from(rh)
    };
    let budget = usize::try_from(frame)
        .ok()
        .and_then(|f| f.checked_add(WORKING_BYTES))
        .ok_or_else(|| PreprocessError::TooLarge(format!("a {w} × {h} PNG")))?;
    let mut decoder =
        png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: budget });
    decoder.set_ignore_iccp_chunk(true);
    decoder.set_ignore_text_chunk(true);
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(error)?;
    let orientation = reader
        .info()
        .exif_metadata
        .as_deref()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    let interlaced = reader.info().interlaced;
    let (color, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight {
        return Err(PreprocessError::Corrupt(format!(
            "PNG output of {depth:?} bits after expansion"
        )));
    }
    let channels = color.samples();
    let img = if k == 1 {
        let size = reader
            .output_buffer_size()
            .filter(|&s| s as u64 <= frame)
            .ok_or_else(|| PreprocessError::TooLarge(format!("a {w} × {h} PNG")))?;
        let mut buf = vec![0u8; size];
        let info = reader.next_frame(&mut buf).map_err(error)?;
        buf.truncate(info.buffer_size());
        image_of(channels, w, h, buf)?
    } else {
        let mut boxes = Boxes::new(w, h, k, channels);
        let mut rows = RowOrder::new(w, h, interlaced);
        while let Some(row) = reader.next_row().map_err(error)? {
            let Some(at) = rows.next() else {
                return Err(PreprocessError::Corrupt(
                    "more PNG rows than its height".into(),
                ));
            };
            boxes.add(at, row.data())?;
        }
        image_of(channels, rw, rh, boxes.finish())?
    };
    Ok((img, orientation))
}

fn error(e: png::DecodingError) -> PreprocessError {
    match e {
        png::DecodingError::LimitsExceeded => PreprocessError::TooLarge(
            "the PNG needs more memory to decode than its frame (at most 4 bytes a pixel)".into(),
        ),
        e => PreprocessError::Corrupt(e.to_string()),
    }
}

/// An 8-bit frame of 1 to 4 channels as an image.
fn image_of(
    channels: usize,
    w: u32,
    h: u32,
    buf: Vec<u8>,
) -> Result<DynamicImage, PreprocessError> {
    match channels {
        1 => image::GrayImage::from_raw(w, h, buf).map(DynamicImage::from),
        2 => image::GrayAlphaImage::from_raw(w, h, buf).map(DynamicImage::from),
        3 => image::RgbImage::from_raw(w, h, buf).map(DynamicImage::from),
        4 => image::RgbaImage::from_raw(w, h, buf).map(DynamicImage::from),
        _ => None,
    }
    .ok_or_else(|| PreprocessError::Corrupt("the PNG frame has the wrong size".into()))
}

/// Where a decoded row's pixels go: its row `y`, first column `x0` and column step `dx` (1 when
/// not interlaced), and how many pixels it has.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RowAt {
    y: u32,
    x0: u32,
    dx: u32,
    pixels: u32,
}

/// The rows in the order the decoder returns them: top to bottom, or Adam7's seven passes (each
/// a sub-image of every `dx`-th column from `x0` of every `dy`-th row from `y0`; empty passes
/// are skipped).
struct RowOrder {
    w: u32,
    h: u32,
    passes: std::slice::Iter<'static, (u32, u32, u32, u32)>,
    pass: (u32, u32, u32, u32),
    next_y: u32,
}

/// Adam7 as the PNG specification lays it out: (x0, y0, dx, dy) per pass.
const ADAM7: [(u32, u32, u32, u32); 7] = [
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
];
const NOT_INTERLACED: [(u32, u32, u32, u32); 1] = [(0, 0, 1, 1)];

impl RowOrder {
    fn new(w: u32, h: u32, interlaced: bool) -> RowOrder {
        let passes: &'static [(u32, u32, u32, u32)] =
            if interlaced { &ADAM7 } else { &NOT_INTERLACED };
        RowOrder {
            w,
            h,
            passes: passes.iter(),
            pass: (0, 0, 1, 1),
            next_y: u32::MAX,
        }
    }
}

impl Iterator for RowOrder {
    type Item = RowAt;

    fn next(&mut self) -> Option<RowAt> {
        loop {
            let (x0, _, dx, dy) = self.pass;
            if self.next_y < self.h && x0 < self.w {
                let y = self.next_y;
                self.next_y = self.next_y.saturating_add(dy);
                return Some(RowAt {
                    y,
                    x0,
                    dx,
                    pixels: (self.w - x0).div_ceil(dx),
                });
            }
            self.pass = *self.passes.next()?;
            self.next_y = self.pass.1;
        }
    }
}

/// Sums of `k × k` boxes of pixels, one u32 per channel.
struct Boxes {
    w: u32,
    h: u32,
    k: u32,
    rw: usize,
    channels: usize,
    sums: Vec<u32>,
}

impl Boxes {
    fn new(w: u32, h: u32, k: u32, channels: usize) -> Boxes {
        let rw = w.div_ceil(k) as usize;
        let rh = h.div_ceil(k) as usize;
        Boxes {
            w,
            h,
            k,
            rw,
            channels,
            sums: vec![0; rw * rh * channels],
        }
    }

    fn add(&mut self, at: RowAt, data: &[u8]) -> Result<(), PreprocessError> {
        let c = self.channels;
        if data.len() != at.pixels as usize * c {
            return Err(PreprocessError::Corrupt(format!(
                "a PNG row of {} bytes where {} were expected",
                data.len(),
                at.pixels as usize * c
            )));
        }
        let row = (at.y / self.k) as usize * self.rw;
        for (i, px) in data.chunks_exact(c).enumerate() {
            let x = at.x0 + i as u32 * at.dx;
            let o = (row + (x / self.k) as usize) * c;
            for (s, &v) in self.sums[o..o + c].iter_mut().zip(px) {
                *s += u32::from(v);
            }
        }
        Ok(())
    }

    /// Each box's mean, rounded (boxes at the right and bottom edges may be narrower).
    fn finish(self) -> Vec<u8> {
        let (k, c) = (self.k, self.channels);
        let side = |i: usize, len: u32| (len - i as u32 * k).min(k);
        let rh = self.sums.len() / (self.rw * c);
        let mut out = Vec::with_capacity(self.sums.len());
        for by in 0..rh {
            let bh = side(by, self.h);
            for bx in 0..self.rw {
                let n = bh * side(bx, self.w);
                let o = (by * self.rw + bx) * c;
                out.extend(self.sums[o..o + c].iter().map(|&s| ((s + n / 2) / n) as u8));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam7_rows_cover_every_pixel_once() {
        for (w, h) in [(1, 1), (2, 3), (5, 1), (8, 8), (9, 17), (33, 7)] {
            let mut seen = vec![0u8; (w * h) as usize];
            for at in RowOrder::new(w, h, true) {
                assert!(at.pixels > 0, "{w}×{h}: an empty row");
                for i in 0..at.pixels {
                    seen[(at.y * w + at.x0 + i * at.dx) as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{w}×{h}: {seen:?}");
            assert_eq!(RowOrder::new(w, h, false).count(), h as usize);
        }
    }

    #[test]
    fn boxes_average_with_narrower_edges() {
        // A 3 × 3 grey frame reduced by 2: boxes of 4, 2, 2 and 1 pixels.
        let mut b = Boxes::new(3, 3, 2, 1);
        for (y, row) in [[10u8, 20, 30], [40, 50, 60], [70, 80, 90]]
            .iter()
            .enumerate()
        {
            let at = RowAt {
                y: y as u32,
                x0: 0,
                dx: 1,
                pixels: 3,
            };
            b.add(at, row).unwrap();
        }
        assert_eq!(b.finish(), vec![30, 45, 75, 90]);
    }
}
