//! Guards chat templates against values that recurse without end: a namespace can be stored in
//! itself (`{% set ns.me = ns %}`, or through another namespace or a list), and minijinja's
//! printing, `tojson`, `string` and `pprint` then recurse until the stack overflows, which aborts
//! the process (fuzzing found it). Those four first walk the value, to a bounded depth and size,
//! and refuse one nested deeper than any real conversation.

use minijinja::{
    value::{Kwargs, ValueKind},
    Environment, Error, ErrorKind, State, Value,
};

/// Nesting deeper than this is refused (messages with tool calls nest about 6 deep).
const MAX_DEPTH: usize = 64;
/// Elements one check looks at, at most (beyond: the value is accepted as it is).
const MAX_NODES: usize = 100_000;

/// Puts the checked formatter and filters into `env`.
pub(crate) fn install(env: &mut Environment<'_>) {
    env.set_formatter(|out, state, value| {
        check(value)?;
        minijinja::escape_formatter(out, state, value)
    });
    env.add_filter("tojson", |value: &Value, indent: Option<Value>, args: Kwargs| {
        check(value)?;
        minijinja::filters::tojson(value, indent, args)
    });
    env.add_filter("string", |state: &State, value: &Value| {
        check(value)?;
        minijinja::filters::string(state, value)
    });
    env.add_filter("pprint", |value: &Value| -> Result<String, Error> {
        check(value)?;
        Ok(minijinja::filters::pprint(value))
    });
}

fn check(value: &Value) -> Result<(), Error> {
    let mut budget = MAX_NODES;
    if too_deep(value, 0, &mut budget) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("a value nested more than {MAX_DEPTH} deep (a namespace stored in itself?)"),
        ));
    }
    Ok(())
}

/// Whether `value` nests deeper than [`MAX_DEPTH`] within the first `budget` elements.
fn too_deep(value: &Value, depth: usize, budget: &mut usize) -> bool {
    if depth > MAX_DEPTH {
        return true;
    }
    let kind = value.kind();
    if !matches!(kind, ValueKind::Map | ValueKind::Seq) {
        return false;
    }
    let Ok(items) = value.try_iter() else { return false };
    for item in items {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        // A map iterates over its keys; the values are what nests.
        let child = if kind == ValueKind::Map { value.get_item(&item).unwrap_or_default() } else { item };
        if too_deep(&child, depth + 1, budget) {
            return true;
        }
    }
    false
}
