//! The parsed tree (`serde_json::Value`) a JSON Schema is run against, built with its memory
//! counted as it grows, so that a document whose tree would take more than the rule's
//! `max_json_tree_bytes` is refused before it does. A tree takes far more than its text: 32 bytes
//! per value, a B-tree node (~640 bytes) per small object, an allocation per string — `[0,0,…]`
//! takes 16 to 32 times its size, and such a text compresses a thousandfold, so a 64 KB gzip
//! body would otherwise cost a gigabyte.
//!
//! The sizes charged are estimates of what the allocations take (rounded up, never less than
//! the tree's own structures); the tree built is exactly the one `serde_json::from_slice` builds.
//! They are also taken from the process-wide body budget (in steps of [`STEP`]), which the
//! caller's share keeps until the tree is dropped.

use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::budget::Held;

/// One value in an array, a map, or at the root.
const VALUE: u64 = std::mem::size_of::<Value>() as u64;
/// One B-tree node of an object's members (11 key/value slots, parent link, edges): charged for
/// each object's first member and every sixth after it, since split nodes are half full.
const NODE: u64 = 768;
/// What the allocator adds to each allocation, near enough.
const ALLOCATION: u64 = 16;
/// The tree's bytes are taken from the process-wide budget this much at a time, not one value at
/// a time.
const STEP: u64 = 64 << 10;

/// Why no tree was built.
#[derive(Debug)]
pub(super) enum TreeError {
    /// The body is not JSON.
    Invalid(serde_json::Error),
    /// Its tree would take more than the limit.
    TooLarge,
    /// The process-wide body budget has no room for the tree.
    BudgetFull,
}

/// The tree of `doc`, if it is JSON and its tree fits in `limit` bytes and in `held`, which
/// pays for the tree until both are dropped.
pub(super) fn parse(doc: &[u8], limit: u64, held: &mut Held) -> Result<Value, TreeError> {
    let budget = Budget {
        limit,
        left: Cell::new(limit),
        exceeded: Cell::new(false),
        held: RefCell::new(std::mem::replace(held, held.sibling())),
        paid: Cell::new(0),
        full: Cell::new(false),
    };
    let mut de = serde_json::Deserializer::from_slice(doc);
    let parsed = budget
        .charge::<serde_json::Error>(VALUE)
        .and_then(|()| Node(&budget).deserialize(&mut de))
        .and_then(|value| de.end().map(|()| value));
    let full = budget.full.get();
    *held = budget.held.into_inner();
    match parsed {
        Ok(value) => Ok(value),
        Err(_) if budget.exceeded.get() => Err(TreeError::TooLarge),
        Err(_) if full => Err(TreeError::BudgetFull),
        Err(e) => Err(TreeError::Invalid(e)),
    }
}

/// What is left of the limit while the tree is built.
struct Budget {
    limit: u64,
    left: Cell<u64>,
    exceeded: Cell<bool>,
    /// The caller's share of the process-wide budget, while the tree is built.
    held: RefCell<Held>,
    /// What of the tree `held` has paid for.
    paid: Cell<u64>,
    /// Whether `held` could not pay.
    full: Cell<bool>,
}

impl Budget {
    /// Takes `bytes` before they are allocated; an error once the limit would be passed or the
    /// process-wide budget cannot pay.
    fn charge<E: serde::de::Error>(&self, bytes: u64) -> Result<(), E> {
        let Some(left) = self.left.get().checked_sub(bytes) else {
            self.exceeded.set(true);
            return Err(E::custom("the JSON tree exceeds its memory limit"));
        };
        self.left.set(left);
        let used = self.limit - left;
        if used > self.paid.get() {
            let step = (used - self.paid.get()).max(STEP);
            if !self.held.borrow_mut().grow(step) {
                self.full.set(true);
                return Err(E::custom("the body budget has no room for the JSON tree"));
            }
            self.paid.set(self.paid.get() + step);
        }
        Ok(())
    }

    fn charge_string<E: serde::de::Error>(&self, len: usize) -> Result<(), E> {
        if len == 0 {
            return Ok(());
        }
        self.charge((len as u64).next_multiple_of(ALLOCATION) + ALLOCATION)
    }
}

/// Builds one value (and whatever it contains) within the budget.
#[derive(Clone, Copy)]
struct Node<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.charge_string(v.len())?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            if items.len() == items.capacity() {
                // The push reallocates: to twice the capacity, at least 4 values.
                let grown = (items.capacity() as u64 * 2).max(4);
                self.0
                    .charge((grown - items.capacity() as u64) * VALUE + ALLOCATION)?;
            }
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        let mut count = 0u64;
        while let Some(key) = map.next_key_seed(Key(self.0))? {
            let value = map.next_value_seed(self)?;
            if count % 6 == 0 {
                self.0.charge(NODE + ALLOCATION)?;
            }
            count += 1;
            members.insert(key, value);
        }
        Ok(Value::Object(members))
    }
}

/// An object member's name, charged before it is allocated.
struct Key<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        self.0.charge_string(v.len())?;
        Ok(v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::budget::BodyBudget;

    fn parse(doc: &[u8], limit: u64) -> Result<Value, TreeError> {
        super::parse(
            doc,
            limit,
            &mut BodyBudget::new(u64::MAX, Default::default()).share(),
        )
    }

    fn tree_bytes(doc: &[u8]) -> u64 {
        let mut low = 0;
        let mut high = 1 << 30;
        // The smallest limit the document fits in.
        while low < high {
            let mid = (low + high) / 2;
            match parse(doc, mid) {
                Ok(_) => high = mid,
                Err(TreeError::TooLarge) => low = mid + 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        low
    }

    #[test]
    fn builds_the_tree_serde_json_builds() {
        let docs: &[&[u8]] = &[
            b"{\"a\": [1, -2, 3.5, 1e300, true, false, null, \"x\\u00e9\\n\"], \"b\": {}, \"a\": 7}",
            b" [ ] ",
            b"\"\"",
            b"18446744073709551615",
            b"-9223372036854775808",
            b"[{\"k\": {\"k\": {\"k\": []}}}]",
        ];
        for doc in docs {
            let expected: Value = serde_json::from_slice(doc).unwrap();
            let built = parse(doc, u64::MAX).unwrap();
            assert_eq!(built, expected, "{}", String::from_utf8_lossy(doc));
        }
        for bad in [&b"[1,]"[..], b"{\"a\" 1}", b"[1] x", b"", b"\"\\ud800\""] {
            let expected = serde_json::from_slice::<Value>(bad)
                .unwrap_err()
                .to_string();
            match parse(bad, u64::MAX) {
                Err(TreeError::Invalid(e)) => assert_eq!(e.to_string(), expected),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(bad)),
            }
        }
    }

    #[test]
    fn a_tree_over_the_limit_is_refused_before_it_is_built() {
        // 200,000 values in 400 KB of text: an array of 6.4 MB at least.
        let values = 200_000u64;
        let mut doc = b"[".to_vec();
        doc.extend(b"0,".repeat(values as usize - 1));
        doc.extend(b"0]");
        assert!(matches!(parse(&doc, 4 << 20), Err(TreeError::TooLarge)));
        let needed = tree_bytes(&doc);
        // What the vector takes, grown by doubling: up to twice the values.
        assert!(
            needed >= values * VALUE && needed <= 2 * values * VALUE + 4096,
            "{values} values are charged {needed} bytes"
        );
        // Small objects cost a B-tree node each.
        let mut doc = b"[".to_vec();
        doc.extend(b"{\"a\":1},".repeat(1000));
        doc.extend(b"{}]");
        let needed = tree_bytes(&doc);
        assert!(needed >= 1000 * 640, "{needed}");
        // Within the limit, a malformed document is said to be malformed.
        assert!(matches!(
            parse(b"[0, 0, x]", 1 << 20),
            Err(TreeError::Invalid(_))
        ));
    }

    #[test]
    fn the_tree_is_paid_from_the_body_budget_until_it_is_dropped() {
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let budget = BodyBudget::new(1 << 20, gauge.clone());
        let mut doc = b"[".to_vec();
        doc.extend(b"0,".repeat(99_999));
        doc.extend(b"0]");
        let mut held = budget.share();
        assert!(matches!(
            super::parse(&doc, u64::MAX, &mut held),
            Err(TreeError::BudgetFull)
        ));
        drop(held);
        assert_eq!(gauge.get(), 0);
        let mut held = budget.share();
        let tree = super::parse(b"[[1], {\"a\": 2}]", u64::MAX, &mut held).unwrap();
        assert!(gauge.get() > 0, "the tree is paid for while it lives");
        drop(tree);
        drop(held);
        assert_eq!(gauge.get(), 0);
    }
}
