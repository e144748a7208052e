//! Reading a held route set's bytes without decoding it: each table's name and byte range,
//! and the protos of a few routes of a table by index (an endpoint-only push rebuilds the routes
//! to the clusters it changed from these, [`super::Snapshot::build_after`]).

use prost::Message as _;
use weft_proto::v1;

use super::{Encoded, Rejection};

/// Calls `f` with each length-delimited field (number, bytes) of the protobuf message encoded
/// in `buf`, in order, skipping the other wire types: reads keys and lengths, decodes nothing.
fn delimited_fields(
    buf: &bytes::Bytes,
    mut f: impl FnMut(u64, bytes::Bytes) -> Result<(), String>,
) -> Result<(), String> {
    delimited_ranges(buf, |field, at| f(field, buf.slice(at)))
}

/// [`delimited_fields`] giving each field's byte range in `buf` (no `Bytes` made per field).
fn delimited_ranges(
    buf: &[u8],
    mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), String>,
) -> Result<(), String> {
    use bytes::Buf;
    let mut rest = buf;
    // A varint, as prost reads one (a key, a length or a value); one byte without a call
    // (keys and most lengths: a table of 10,000 routes is scanned per endpoint push).
    let varint = |buf: &mut &[u8]| match buf.first() {
        Some(&b) if b < 0x80 => {
            *buf = &buf[1..];
            Ok(usize::from(b))
        }
        _ => prost::decode_length_delimiter(buf).map_err(|e| e.to_string()),
    };
    while rest.has_remaining() {
        let key = varint(&mut rest)?;
        let len = match key & 7 {
            0 => varint(&mut rest).map(|_| 0)?,
            1 => 8,
            2 => varint(&mut rest)?,
            5 => 4,
            // Groups: proto3 (and prost) never writes them.
            w => return Err(format!("unexpected wire type {w}")),
        };
        if len > rest.remaining() {
            return Err("field overruns the message".into());
        }
        let start = buf.len() - rest.len();
        rest.advance(len);
        if key & 7 == 2 {
            f((key >> 3) as u64, start..start + len)?;
        }
    }
    Ok(())
}

/// `v1::RouteSet.tables` and `v1::RouteTable.routes` (proto/weft/v1/discovery.proto).
const ROUTE_SET_TABLES: u64 = 2;
const ROUTE_TABLE_NAME: u64 = 1;
const ROUTE_TABLE_ROUTES: u64 = 2;

/// Each table of a held route set, named, as its encoded `v1::RouteTable` (a slice of the
/// held bytes), in the set's order: found by reading keys and lengths, no route decoded.
pub(super) fn held_route_tables(
    e: &Encoded<v1::RouteSet>,
) -> Result<Vec<(String, bytes::Bytes)>, Rejection> {
    let mut tables = Vec::new();
    delimited_fields(&e.bytes, |field, table| {
        if field == ROUTE_SET_TABLES {
            let mut name = String::new();
            delimited_fields(&table, |field, b| {
                if field == ROUTE_TABLE_NAME {
                    name = String::from_utf8(b.to_vec()).map_err(|e| e.to_string())?;
                }
                Ok(())
            })?;
            tables.push((name, table));
        }
        Ok(())
    })
    .map_err(|err| {
        Rejection::new(
            "held route set",
            "routes",
            format!("version {:?} does not decode: {err}", e.version()),
        )
    })?;
    Ok(tables)
}

/// Routes `at` (ascending indices) of the held table `name` encoded in `bytes`, decoded.
pub(super) fn held_table_routes(
    name: &str,
    bytes: &bytes::Bytes,
    at: &[usize],
) -> Result<Vec<v1::Route>, Rejection> {
    let mut routes = Vec::with_capacity(at.len());
    let mut i = 0;
    let mut wanted = at.iter().peekable();
    delimited_ranges(bytes, |field, route| {
        if field != ROUTE_TABLE_ROUTES {
            return Ok(());
        }
        if wanted.peek() == Some(&&i) {
            wanted.next();
            routes.push(v1::Route::decode(bytes.slice(route)).map_err(|e| e.to_string())?);
        }
        i += 1;
        Ok(())
    })
    .map_err(|err| held_table_corrupt(name, &err))?;
    if let Some(missing) = wanted.next() {
        return Err(held_table_corrupt(
            name,
            &format!("route {missing} of a table of {i} routes"),
        ));
    }
    Ok(routes)
}

pub(super) fn held_table_corrupt(name: &str, err: &str) -> Rejection {
    Rejection::new(
        format!("held route table {name:?}"),
        "routes",
        format!("does not decode: {err}"),
    )
}
