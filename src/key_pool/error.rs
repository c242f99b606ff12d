//! [`KeyPoolError`]: why the key pool could not be built or could not pick a key.

use std::fmt;

/// What went wrong in the key pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyPoolErrorKind {
    /// [`KeyPoolLayer::new`](super::KeyPoolLayer::new) got no key.
    NoKeys,
    /// A key is empty or cannot be sent as an HTTP header value (see
    /// [`KeyPoolError::index`]).
    InvalidKey,
    /// Every key of the pool is out of rotation (spend cap reached, revoked, or removed by
    /// hand): the request was not sent.
    AllKeysRemoved,
}

/// An error of the key pool.
///
/// Services return it boxed in a [`BoxError`](crate::BoxError); find it with
/// `err.downcast_ref::<KeyPoolError>()`. It never contains a key, only positions and counts.
///
/// ```
/// use tower_claude::key_pool::{KeyPoolErrorKind, KeyPoolLayer};
///
/// let err = KeyPoolLayer::new(["sk-ant-good", "bad\nkey"]).unwrap_err();
/// assert_eq!(err.kind(), KeyPoolErrorKind::InvalidKey);
/// assert_eq!(err.index(), Some(1));
/// assert!(!err.to_string().contains("bad"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPoolError {
    kind: KeyPoolErrorKind,
    index: Option<usize>,
    removed: usize,
}

impl KeyPoolError {
    pub(crate) fn new(kind: KeyPoolErrorKind) -> Self {
        Self {
            kind,
            index: None,
            removed: 0,
        }
    }

    pub(crate) fn invalid_key(index: usize) -> Self {
        Self {
            index: Some(index),
            ..Self::new(KeyPoolErrorKind::InvalidKey)
        }
    }

    pub(crate) fn all_removed(removed: usize) -> Self {
        Self {
            removed,
            ..Self::new(KeyPoolErrorKind::AllKeysRemoved)
        }
    }

    /// The kind of error.
    pub fn kind(&self) -> KeyPoolErrorKind {
        self.kind
    }

    /// For [`InvalidKey`](KeyPoolErrorKind::InvalidKey): the position of the bad key in the
    /// list given to the layer.
    pub fn index(&self) -> Option<usize> {
        self.index
    }

    /// For [`AllKeysRemoved`](KeyPoolErrorKind::AllKeysRemoved): how many keys are out of
    /// rotation (the whole pool).
    pub fn removed(&self) -> usize {
        self.removed
    }
}

impl fmt::Display for KeyPoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            KeyPoolErrorKind::NoKeys => f.write_str("the key pool needs at least one API key"),
            KeyPoolErrorKind::InvalidKey => match self.index {
                Some(i) => write!(
                    f,
                    "API key #{i} of the pool is empty or not a valid header value"
                ),
                None => f.write_str("an API key of the pool is empty or not a valid header value"),
            },
            KeyPoolErrorKind::AllKeysRemoved => write!(
                f,
                "all {} API keys of the pool are out of rotation (spend cap reached or key rejected)",
                self.removed
            ),
        }
    }
}

impl std::error::Error for KeyPoolError {}
