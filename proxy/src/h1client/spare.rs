//! One spare [`HeaderMap`] per thread for the next response head ([`super::parse_head`]).
//!
//! Every proxied request allocates a header map twice over: the response's map (its index and
//! its entries) is built here, goes downstream and is kept by hyper for the next request's head,
//! while the request's map is dropped once its attempts are over. The request's map, emptied,
//! is the next response's: [`give`] keeps it (`attempts::send` gives the head it lent to its
//! attempts), [`take`] hands it out. Two allocations and two frees per request fewer
//! (benches/RESULTS.md, callgrind). Emptying drops the values as dropping the map would, and
//! resets the map's hashing state; maps with room for more than [`MAX_KEPT`] fields are not kept
//! (a request with many fields must not pin memory), and at most one map per thread is.

use std::cell::RefCell;

use http::HeaderMap;

/// Maps with a larger capacity are dropped, not kept.
pub const MAX_KEPT: usize = 64;

thread_local! {
    static SPARE: RefCell<Option<HeaderMap>> = const { RefCell::new(None) };
}

/// Keeps `map`, emptied, for the next [`take`] on this thread (unless one is kept already or
/// it is larger than [`MAX_KEPT`]).
pub fn give(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > MAX_KEPT {
        return;
    }
    map.clear();
    let refused = SPARE
        .try_with(|spare| match spare.try_borrow_mut() {
            Ok(mut slot) if slot.is_none() => {
                *slot = Some(map);
                None
            }
            _ => Some(map),
        })
        .ok()
        .flatten();
    drop(refused);
}

/// An empty map with room for at least `fields` fields: the kept one if there is one.
pub fn take(fields: usize) -> HeaderMap {
    let kept = SPARE
        .try_with(|spare| spare.try_borrow_mut().ok().and_then(|mut slot| slot.take()))
        .ok()
        .flatten();
    match kept {
        Some(mut map) => {
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{CONTENT_LENGTH, HOST};
    use http::HeaderValue;

    #[test]
    fn a_given_map_comes_back_empty_once() {
        // Whatever an earlier test on this thread left.
        let _ = take(0);
        let mut m = HeaderMap::with_capacity(8);
        m.insert(HOST, HeaderValue::from_static("a"));
        m.append(HOST, HeaderValue::from_static("b"));
        let cap = m.capacity();
        give(m);
        let back = take(4);
        assert!(back.is_empty());
        assert_eq!(back.capacity(), cap, "the kept map, not a new one");
        assert!(back.get(HOST).is_none());
        // Taken: the next one is new.
        assert_eq!(
            take(2).capacity(),
            HeaderMap::<HeaderValue>::with_capacity(2).capacity()
        );
    }

    #[test]
    fn large_maps_are_not_kept_and_take_has_room() {
        let _ = take(0);
        let mut big = HeaderMap::with_capacity(MAX_KEPT * 2);
        big.insert(CONTENT_LENGTH, HeaderValue::from_static("1"));
        give(big);
        assert_eq!(
            take(1).capacity(),
            HeaderMap::<HeaderValue>::with_capacity(1).capacity()
        );
        give(HeaderMap::with_capacity(4));
        assert!(take(40).capacity() >= 40);
    }
}
