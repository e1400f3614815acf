//! Per-sensor sample windows of fixed capacity.
//!
//! Each sensor owns one [`Window`]: a `heapless` ring of [`MAX_WINDOW`] samples, so its memory
//! is fixed when the sensor is first seen and never grows. A window of `len` samples is handed
//! out every `stride` samples once `len` have arrived: `stride == len` gives back-to-back
//! windows, a smaller stride gives overlapping ones. A payload that carries several strides'
//! worth of samples yields several windows, in order.

use heapless::HistoryBuf;

use crate::config::MAX_WINDOW;

/// The last samples of one sensor.
#[derive(Debug)]
pub struct Window {
    ring: HistoryBuf<f32, MAX_WINDOW>,
    len: usize,
    stride: usize,
    since_last: usize,
}

impl Window {
    /// A window of `len` samples (at most [`MAX_WINDOW`]) emitted every `stride` samples.
    pub fn new(len: usize, stride: usize) -> Self {
        assert!(
            (1..=MAX_WINDOW).contains(&len) && stride >= 1,
            "checked when the model is loaded"
        );
        Window {
            ring: HistoryBuf::new(),
            len,
            stride,
            since_last: 0,
        }
    }

    /// Appends samples, calling `emit` with each complete window they produce.
    pub fn push(&mut self, samples: &[f32], mut emit: impl FnMut(Vec<f32>)) {
        for &sample in samples {
            self.ring.write(sample);
            self.since_last += 1;
            if self.ring.len() >= self.len && self.since_last >= self.stride {
                self.since_last = 0;
                emit(self.latest());
            }
        }
    }

    /// The newest `len` samples, oldest first, copied out of the ring's two halves.
    fn latest(&self) -> Vec<f32> {
        let (older, newer) = self.ring.as_slices();
        let from_newer = self.len.min(newer.len());
        let from_older = self.len - from_newer;
        let mut window = Vec::with_capacity(self.len);
        window.extend_from_slice(&older[older.len() - from_older..]);
        window.extend_from_slice(&newer[newer.len() - from_newer..]);
        window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(window: &mut Window, samples: &[f32]) -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        window.push(samples, |w| out.push(w));
        out
    }

    #[test]
    fn tumbling_window_emits_once_per_full_window() {
        let mut w = Window::new(4, 4);
        assert!(collect(&mut w, &[1.0, 2.0, 3.0]).is_empty());
        assert_eq!(collect(&mut w, &[4.0, 5.0]), vec![vec![1.0, 2.0, 3.0, 4.0]]);
        assert_eq!(
            collect(&mut w, &[6.0, 7.0, 8.0]),
            vec![vec![5.0, 6.0, 7.0, 8.0]]
        );
    }

    #[test]
    fn sliding_window_overlaps_by_len_minus_stride() {
        let mut w = Window::new(4, 2);
        let samples: Vec<f32> = (1..=8).map(|i| i as f32).collect();
        assert_eq!(
            collect(&mut w, &samples),
            vec![
                vec![1.0, 2.0, 3.0, 4.0],
                vec![3.0, 4.0, 5.0, 6.0],
                vec![5.0, 6.0, 7.0, 8.0]
            ]
        );
    }

    #[test]
    fn windows_stay_in_order_once_the_ring_wraps() {
        // Strides that do and do not divide the ring, so windows straddle its seam.
        for (len, stride) in [(128, 128), (100, 37), (MAX_WINDOW, 300), (5, 1)] {
            let mut w = Window::new(len, stride);
            let samples: Vec<f32> = (0..5 * MAX_WINDOW).map(|i| i as f32).collect();
            let windows = collect(&mut w, &samples);
            assert_eq!(windows.len(), (samples.len() - len) / stride + 1);
            for (k, window) in windows.iter().enumerate() {
                let first = (k * stride) as f32;
                let expected: Vec<f32> = (0..len).map(|i| first + i as f32).collect();
                assert_eq!(
                    window, &expected,
                    "window {k} of len {len}, stride {stride}"
                );
            }
        }
    }

    #[test]
    fn memory_stays_at_capacity_however_many_samples_arrive() {
        let mut w = Window::new(MAX_WINDOW, MAX_WINDOW);
        let mut count = 0;
        for _ in 0..10 {
            w.push(&vec![0.5; MAX_WINDOW + 7], |win| {
                assert_eq!(win.len(), MAX_WINDOW);
                count += 1;
            });
        }
        assert_eq!(count, 10);
        assert_eq!(w.ring.len(), MAX_WINDOW);
    }
}
