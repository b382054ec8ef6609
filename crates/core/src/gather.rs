//! A request's bytes as they arrive, in one buffer at the end: REST bodies (the HTTP crate's
//! `extract.rs`) and gRPC messages (the gRPC crate's `fast.rs`) are gathered the same way.
//!
//! Bytes that came in one chunk are kept as they came, a slice of the connection's read buffer
//! (no copy). From a second chunk on they are copied into a buffer that grows with what has
//! arrived (at least doubling, so copies stay linear) but never past the declared length, so a
//! 13 MiB body ends in 13 MiB, not 16, and a 384 KiB gRPC message in 384 KiB, not 512. The
//! declared length is a claim: it caps the growth, it never sizes an allocation up front.

use bytes::Bytes;

#[derive(Default)]
pub struct Gather {
    first: Option<Bytes>,
    rest: Vec<u8>,
}

impl Gather {
    /// Adds `chunk`; `declared` is the declared length of all the bytes this gathers (0 when
    /// unknown), a cap on the buffer's growth, never a size to allocate up front.
    pub fn push(&mut self, chunk: Bytes, declared: usize) {
        if chunk.is_empty() {
            return;
        }
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(chunk);
            return;
        }
        let held = self.first.take();
        reserve_for(
            &mut self.rest,
            held.as_ref().map_or(0, Bytes::len) + chunk.len(),
            declared,
        );
        if let Some(f) = held {
            self.rest.extend_from_slice(&f);
        }
        self.rest.extend_from_slice(&chunk);
    }

    /// How many bytes have been gathered.
    pub fn len(&self) -> usize {
        self.first.as_ref().map_or(self.rest.len(), Bytes::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `N` bytes gathered, once that many have arrived.
    pub fn head<const N: usize>(&self) -> Option<[u8; N]> {
        let bytes = self.first.as_deref().unwrap_or(&self.rest);
        bytes.get(..N)?.try_into().ok()
    }

    pub fn finish(self) -> Bytes {
        self.first.unwrap_or_else(|| Bytes::from(self.rest))
    }

    /// [`Gather::finish`], but bytes under `small` that are still a slice of a chunk are copied
    /// out of it, so that what they are kept for (a tensor waiting in a queue) does not hold the
    /// whole read buffer the chunk is a slice of (up to `READ_BUFFER` in the HTTP crate's
    /// `serve.rs`).
    pub fn finish_detached_below(self, small: usize) -> Bytes {
        match self.first {
            Some(first) if first.len() < small => Bytes::copy_from_slice(&first),
            _ => self.finish(),
        }
    }
}

/// Makes room in `buf` for `more` bytes: at least doubling (so copies stay linear in the body's
/// size), but never past `declared` (the declared length of what `buf` gathers, when that is
/// at least what has arrived), so a body ends in a buffer of its own size. Nothing beyond
/// twice what has arrived: a gRPC connection has up to 128 messages arriving at once, and a
/// floor of 64 KiB a buffer let a client that sent a few bytes of each, declaring 16 MiB, hold
/// 8 MiB a connection.
fn reserve_for(buf: &mut Vec<u8>, more: usize, declared: usize) {
    let needed = buf.len() + more;
    if needed > buf.capacity() {
        let mut cap = needed.max(2 * buf.capacity());
        if declared >= needed {
            cap = cap.min(declared);
        }
        buf.reserve_exact(cap - buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_chunk_is_kept_as_it_came_and_several_are_gathered_in_order() {
        let one = Bytes::from(vec![7u8; 100]);
        let mut g = Gather::default();
        g.push(Bytes::new(), 100);
        assert_eq!((g.len(), g.head::<1>()), (0, None));
        g.push(one.clone(), 100);
        assert_eq!((g.len(), g.head::<2>()), (100, Some([7, 7])));
        let got = g.finish();
        assert_eq!(got.as_ptr(), one.as_ptr(), "a lone chunk is not copied");

        let mut g = Gather::default();
        for (i, n) in [3usize, 0, 5, 2].into_iter().enumerate() {
            g.push(Bytes::from(vec![i as u8; n]), 10);
        }
        assert_eq!((g.len(), g.head::<4>()), (10, Some([0, 0, 0, 2])));
        assert_eq!(g.head::<11>(), None);
        let got = g.finish();
        assert_eq!(&got[..], &[0, 0, 0, 2, 2, 2, 2, 2, 3, 3]);

        // Below the size given, a lone chunk is copied out of the buffer it is a slice of.
        let mut g = Gather::default();
        g.push(one.clone(), 100);
        let got = g.finish_detached_below(101);
        assert_ne!(got.as_ptr(), one.as_ptr());
        assert_eq!(got, one);
        let mut g = Gather::default();
        g.push(one.clone(), 100);
        assert_eq!(g.finish_detached_below(100).as_ptr(), one.as_ptr());
    }

    #[test]
    fn the_buffer_grows_with_what_came_but_not_past_the_declared_length() {
        // 13 chunks of 1 MiB, 13 MiB declared: the buffer ends at 13 MiB, not 16.
        let mut buf = Vec::new();
        for _ in 0..13 {
            reserve_for(&mut buf, 1 << 20, 13 << 20);
            buf.extend(std::iter::repeat_n(1u8, 1 << 20));
        }
        assert_eq!(buf.capacity(), 13 << 20);
        // A declared length smaller than what came (a lie) does not cap the growth below it.
        let mut buf = vec![0u8; 10];
        reserve_for(&mut buf, 100_000, 50);
        assert!(buf.capacity() >= 100_010);
        // Nothing is allocated for a declared length before its bytes come: a few bytes
        // declaring 16 MiB hold a buffer of about their own size.
        let mut g = Gather::default();
        g.push(Bytes::from(vec![1u8; 3]), 16 << 20);
        g.push(Bytes::from(vec![2u8; 3]), 16 << 20);
        assert!(g.rest.capacity() <= 12, "{}", g.rest.capacity());
        g.push(Bytes::from(vec![3u8; 3]), 16 << 20);
        assert!(g.rest.capacity() <= 18, "{}", g.rest.capacity());
        assert_eq!(&g.finish()[..], &[1, 1, 1, 2, 2, 2, 3, 3, 3]);
    }
}
