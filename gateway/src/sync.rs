//! The one way the gateway takes a `std::sync::Mutex`.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, taking it over if a panic elsewhere poisoned it.
///
/// Every update under the gateway's locks is a plain field write, short and never across an
/// `.await`: a panic elsewhere cannot leave the data inconsistent enough to be worth taking the
/// gateway down for.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
