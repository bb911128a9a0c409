//! Reading the files named in ferry's configuration (the config file, tokens and credentials
//! files, certificates, keys, CA bundles, web config, JSON schemas, the agent's token file, the
//! geoip database, the gateway's agents file) without ever waiting on one.
//!
//! Opening a named pipe for reading waits for a writer, and reading a pipe or a device waits for
//! data: a start, a `check-config` or a SIGHUP reload would hang on a FIFO left where a file
//! was, holding SIGTERM with it. These files are opened without blocking and refused unless they
//! are regular files, with an error that says what the path is instead.

use std::fs::File;
use std::io::{self, Read as _};
use std::path::Path;

/// Opens `path` for reading, refusing anything but a regular file (after symlinks). Opened
/// without blocking and checked on the open file, not before: a check before opening would race
/// with the file being replaced. The error says what is wrong, without the path.
pub(crate) fn open_regular(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Without O_NONBLOCK, open(2) of a FIFO waits for a writer; reads of a regular file ignore
    // the flag.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        Ok(file)
    } else if kind.is_dir() {
        Err(io::Error::other("is a directory"))
    } else {
        Err(io::Error::other(format!(
            "not a regular file ({})",
            file_kind(kind)
        )))
    }
}

/// The whole of the regular file `path` (see [`open_regular`]).
pub(crate) fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// [`read_regular`] for a text file, with the error `std::fs::read_to_string` gives for bytes
/// that are not UTF-8.
pub(crate) fn read_regular_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// What a non-regular file is, for the error.
fn file_kind(kind: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a named pipe";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
    }
    let _ = kind;
    "not a plain file"
}

/// A named pipe at `path`, for the tests of every reader that must refuse one.
#[cfg(all(test, unix))]
pub(crate) fn make_fifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Runs `f` on a thread and waits at most 5 s for it: a regression that blocks on a FIFO
    /// fails the test instead of hanging it.
    fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("reading the file blocked for 5 s")
    }

    #[cfg(unix)]
    #[test]
    fn a_named_pipe_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("tokens");
        make_fifo(&fifo);
        let started = Instant::now();
        let err = bounded({
            let fifo = fifo.clone();
            move || read_regular(&fifo).unwrap_err().to_string()
        });
        assert_eq!(err, "not a regular file (a named pipe)");
        let err = bounded(move || read_regular_to_string(&fifo).unwrap_err().to_string());
        assert_eq!(err, "not a regular file (a named pipe)");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_regular_to_string(dir.path()).unwrap_err();
        assert_eq!(err.to_string(), "is a directory");
    }

    #[cfg(unix)]
    #[test]
    fn a_device_is_refused() {
        let err = bounded(|| {
            read_regular(Path::new("/dev/zero"))
                .unwrap_err()
                .to_string()
        });
        assert_eq!(err, "not a regular file (a device)");
    }

    #[test]
    fn a_regular_file_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "agent-1 sha256:00\n").unwrap();
        assert_eq!(
            read_regular_to_string(&path).unwrap(),
            "agent-1 sha256:00\n"
        );
        std::fs::write(&path, b"\xff\xfe").unwrap();
        assert_eq!(read_regular(&path).unwrap(), b"\xff\xfe");
        let err = read_regular_to_string(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_missing_file_keeps_the_os_error() {
        let err = read_regular(Path::new("/nonexistent/tokens")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(err.to_string(), "No such file or directory (os error 2)");
    }
}
