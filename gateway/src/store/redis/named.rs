//! A script's keys and arguments by name. Redis hands a script its keys and arguments by
//! position; a script with many keeps their names in one [`Names`] list: the invocation pushes
//! each by name, checked against the list, and the script reads them into locals of the same
//! names in one block at its top, which `assert_script_reads` checks in a test.

use deadpool_redis::redis::{ScriptInvocation, ToRedisArgs};

/// The names of a script's keys and arguments, in order.
#[derive(Debug)]
pub(crate) struct Names {
    pub(crate) keys: &'static [&'static str],
    pub(crate) args: &'static [&'static str],
    /// The local holding where the keys past the named ones start, if the script takes any.
    pub(crate) more_keys: Option<&'static str>,
    /// The local holding where the arguments past the named ones start, if any.
    pub(crate) more_args: Option<&'static str>,
}

#[derive(Debug, Clone, Copy)]
enum List {
    Keys,
    Args,
}

/// An invocation taking the named keys and arguments of a script, each in its place.
pub(crate) struct Named<'i, 's> {
    invocation: &'i mut ScriptInvocation<'s>,
    names: &'static Names,
    keys: usize,
    args: usize,
}

impl<'i, 's> Named<'i, 's> {
    pub(crate) fn new(invocation: &'i mut ScriptInvocation<'s>, names: &'static Names) -> Self {
        Named {
            invocation,
            names,
            keys: 0,
            args: 0,
        }
    }

    /// The next key, which must be the one named `name`.
    pub(crate) fn key<T: ToRedisArgs>(self, name: &str, key: T) -> Self {
        self.put(List::Keys, Some(name), key)
    }

    /// The next argument, which must be the one named `name`.
    pub(crate) fn arg<T: ToRedisArgs>(self, name: &str, arg: T) -> Self {
        self.put(List::Args, Some(name), arg)
    }

    /// A key past the named ones.
    pub(crate) fn more_key<T: ToRedisArgs>(self, key: T) -> Self {
        self.put(List::Keys, None, key)
    }

    /// An argument past the named ones.
    pub(crate) fn more_arg<T: ToRedisArgs>(self, arg: T) -> Self {
        self.put(List::Args, None, arg)
    }

    fn put<T: ToRedisArgs>(mut self, list: List, name: Option<&str>, value: T) -> Self {
        let (names, more, given) = match list {
            List::Keys => (self.names.keys, self.names.more_keys, &mut self.keys),
            List::Args => (self.names.args, self.names.more_args, &mut self.args),
        };
        match name {
            Some(name) => assert_eq!(
                names.get(*given).copied(),
                Some(name),
                "{list:?} {} of the script",
                *given + 1
            ),
            None => assert!(
                more.is_some() && *given >= names.len(),
                "{list:?} past the script's named ones"
            ),
        }
        *given += 1;
        match list {
            List::Keys => self.invocation.key(value),
            List::Args => self.invocation.arg(value),
        };
        self
    }

    /// Checks that every named key and argument was given.
    pub(crate) fn done(self) {
        assert!(
            self.keys >= self.names.keys.len() && self.args >= self.names.args.len(),
            "the script's named keys and arguments"
        );
    }
}

/// Checks that `script` starts (after its comment lines) with one block reading its keys and
/// arguments into locals named as in `names`, in order (`local record_key = KEYS[1]`), then
/// where the keys and arguments past them start; and that nowhere else does it take a key or
/// an argument by a number of its own.
#[cfg(test)]
pub(crate) fn assert_script_reads(script: &str, names: &Names) {
    let mut expected: Vec<String> = Vec::new();
    for (list, table) in [(names.keys, "KEYS"), (names.args, "ARGV")] {
        for (index, name) in list.iter().enumerate() {
            expected.push(format!("local {name} = {table}[{}]", index + 1));
        }
    }
    if let Some(name) = names.more_keys {
        expected.push(format!("local {name} = {}", names.keys.len() + 1));
    }
    if let Some(name) = names.more_args {
        expected.push(format!("local {name} = {}", names.args.len() + 1));
    }
    let mut lines = script
        .lines()
        .skip_while(|line| line.starts_with("--"))
        .map(|line| line.split(" --").next().unwrap_or(line).trim_end());
    let block: Vec<&str> = lines.by_ref().take(expected.len()).collect();
    assert_eq!(
        block, expected,
        "the script's first lines after its comment"
    );
    for line in lines {
        for table in ["KEYS[", "ARGV["] {
            for (at, _) in line.match_indices(table) {
                let next = line[at + table.len()..].chars().next();
                assert!(
                    !next.is_some_and(|c| c.is_ascii_digit()),
                    "the script takes {table}…] by number past its first block: {line}"
                );
            }
        }
    }
}
