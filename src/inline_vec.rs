//! A vector that keeps its first `N` items inline. What a request is made of (its descriptors,
//! its data buffers, the extents it maps to) is nearly always a few items, and handling one
//! request should not allocate.

use std::ops::{Deref, DerefMut};

#[derive(Debug, Clone)]
pub struct InlineVec<T, const N: usize> {
    inline: [T; N],
    len: usize,
    /// Every item once there are more than fit inline.
    spilled: Vec<T>,
}

impl<T: Copy + Default, const N: usize> Default for InlineVec<T, N> {
    fn default() -> Self {
        InlineVec {
            inline: [T::default(); N],
            len: 0,
            spilled: Vec::new(),
        }
    }
}

impl<T: Copy, const N: usize> InlineVec<T, N> {
    pub fn push(&mut self, item: T) {
        if self.len < N {
            self.inline[self.len] = item;
        } else {
            if self.spilled.is_empty() {
                self.spilled.extend_from_slice(&self.inline);
            }
            self.spilled.push(item);
        }
        self.len += 1;
    }

    /// Keeps the first `len` items.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if self.len > N {
            self.spilled.truncate(len);
            if len <= N {
                self.inline[..len].copy_from_slice(&self.spilled[..len]);
                self.spilled.clear();
            }
        }
        self.len = len;
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }
}

impl<T, const N: usize> Deref for InlineVec<T, N> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        if self.len <= N {
            &self.inline[..self.len]
        } else {
            &self.spilled
        }
    }
}

impl<T, const N: usize> DerefMut for InlineVec<T, N> {
    fn deref_mut(&mut self) -> &mut [T] {
        if self.len <= N {
            &mut self.inline[..self.len]
        } else {
            &mut self.spilled
        }
    }
}

impl<'a, T, const N: usize> IntoIterator for &'a InlineVec<T, N> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: PartialEq, const N: usize> PartialEq for InlineVec<T, N> {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl<T: Eq, const N: usize> Eq for InlineVec<T, N> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_push_order_past_the_inline_items() {
        let mut v = InlineVec::<u32, 2>::default();
        assert!(v.is_empty());
        for i in 0..5 {
            v.push(i * 10);
            let want: Vec<u32> = (0..=i).map(|j| j * 10).collect();
            assert_eq!(v[..], want[..]);
        }
        v[4] += 1;
        assert_eq!(v.last(), Some(&41));
        assert_eq!(v.clone(), v);
        v.truncate(3);
        assert_eq!(v[..], [0, 10, 20]);
        v.push(7);
        assert_eq!(v[..], [0, 10, 20, 7]);
        v.truncate(1);
        v.push(9);
        assert_eq!(v[..], [0, 9]);
        v.clear();
        assert!(v.is_empty());
    }
}
