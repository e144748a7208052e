//! The declarations of the files one set holds and another does not (with the same name and
//! content): what can differ between the two sets, so comparing them (`diff::policy_changes`)
//! costs what changed rather than the whole mesh.
//!
//! In a valid set every service (name and namespace), route and authorization policy name is
//! declared once. A declaration in a file both sets hold with the same content is therefore,
//! in both sets, that file's: the same parse of the same bytes, equal. Every declaration that
//! appears, disappears or differs comes from a file one set holds and the other does not.

use super::{AuthorizationPolicy, PolicySet, Route, Service};

/// Declarations of some of a set's files, in the set's order.
#[derive(Debug, Default)]
pub struct Declarations<'a> {
    pub services: Vec<&'a Service>,
    pub routes: Vec<&'a Route>,
    pub authorization: Vec<&'a AuthorizationPolicy>,
}

impl PolicySet {
    /// The declarations of this set's files that `other` does not hold with the same name and
    /// content; with the mesh, everything that can differ from `other` (module doc).
    pub fn declared_apart_from(&self, other: &PolicySet) -> Declarations<'_> {
        let mut out = Declarations::default();
        for (file, parts) in self.files.iter().zip(&self.parts) {
            let shared = other
                .files
                .binary_search_by(|f| f.name.as_str().cmp(&file.name))
                .is_ok_and(|j| other.files[j].content == file.content);
            if shared {
                continue;
            }
            out.services.extend(&self.services[parts.services.clone()]);
            out.routes.extend(&self.routes[parts.routes.clone()]);
            out.authorization
                .extend(&self.authorization[parts.authorization.clone()]);
        }
        out
    }
}
