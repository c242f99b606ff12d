//! [`Recent`]: the last few values one thread derived from some bytes, so that the same input
//! seen again (the same API key, the same rate-limit reset time) is not derived again.

/// Entries per thread.
pub(crate) const SLOTS: usize = 4;

/// The last [`SLOTS`] `(input, value)` pairs one thread derived, replaced round robin: for a
/// `thread_local!` (no lock; a lookup compares at most [`SLOTS`] inputs). Inputs longer than
/// the bound given to [`new`](Self::new) are not kept.
pub(crate) struct Recent<V> {
    slots: [Option<(Box<[u8]>, V)>; SLOTS],
    /// The slot the next new input replaces.
    next: usize,
    max_input: usize,
}

impl<V: Clone> Recent<V> {
    /// An empty memo that keeps inputs of at most `max_input` bytes.
    pub(crate) const fn new(max_input: usize) -> Self {
        Self {
            slots: [const { None }; SLOTS],
            next: 0,
            max_input,
        }
    }

    /// The value remembered for `input`, if any.
    pub(crate) fn get(&self, input: &[u8]) -> Option<V> {
        self.slots
            .iter()
            .flatten()
            .find(|(k, _)| **k == *input)
            .map(|(_, v)| v.clone())
    }

    /// Remembers `value` for `input`, in place of the oldest entry.
    pub(crate) fn put(&mut self, input: &[u8], value: V) {
        if input.len() > self.max_input {
            return;
        }
        self.slots[self.next] = Some((input.into(), value));
        self.next = (self.next + 1) % SLOTS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_inputs_and_only_short_ones() {
        let mut r = Recent::new(3);
        for i in 0..SLOTS as u8 * 2 {
            r.put(&[i], i);
        }
        for i in 0..SLOTS as u8 * 2 {
            let kept = i >= SLOTS as u8;
            assert_eq!(r.get(&[i]), kept.then_some(i), "{i}");
        }
        r.put(b"long", 9);
        assert_eq!(r.get(b"long"), None);
    }
}
