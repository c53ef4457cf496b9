"""Is a checkpoint file intact? The CRC-32 of every record of torch's zip format, read back in full.

`torch.save` writes a zip archive of stored (uncompressed) records: `archive/data.pkl` (the pickled structure),
`archive/data/<n>` (one per tensor storage), a few small ones, and the central directory at the end. Its writer
stores each record's CRC-32, but `torch.load` never checks them: bytes changed in the middle of a file (size kept)
load as if nothing happened, and a weight turned into NaN is trained on and exported. `damage(path)` checks them:

    intact  <=>  for every record r in the central directory:
                     r's local header matches the central directory (name, sizes), and
                     crc32(the bytes of r) == the CRC-32 stored for r

A truncated file fails before that: its central directory, at the end, is missing.

Why these CRCs rather than a sha256 written beside each checkpoint (`step_XXXXXXXX.pt.sha256`):
- every checkpoint already carries them, those written before this check existed included: old runs are verified
  exactly like new ones, with no "no checksum, load unverified" case (a stronger rule, backwards compatible);
- a checkpoint stays one file made by one atomic rename; a sidecar is a second rename, and a crash between the two
  leaves an intact checkpoint without its checksum, or a checksum of the previous file under the same name;
- the reason names the damaged record (`archive/data/17`), and the check is one sequential read of the file.
CRC-32 detects every burst of up to 32 flipped bits and all but 2**-32 of longer damage: it guards against
accidents (disk, copy, memory), not tampering, which weights_only loading already keeps from running code. Bytes
outside every record (zip header padding) are not covered; torch.load does not read them either.

Cost: one read of the whole file, about 1.5 GB/s for the CRC on one core, when a run resumes and before a
divergence rollback; the torch.load that follows finds the file in the page cache.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

CORRUPT_FOLDER = "corrupt"
_CHUNK = 1 << 24  # 16 MiB reads: large enough that the Python loop costs nothing next to the CRC


def damage(path: str | Path) -> str | None:
    """None when every record of `path` matches its stored CRC-32; else what is wrong, as one phrase."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                # open() compares the local header with the central directory; reading to the end of a record
                # compares its CRC-32 (zipfile raises BadZipFile "Bad CRC-32 for file ..." there)
                with archive.open(info) as record:
                    while record.read(_CHUNK):
                        pass
    except zipfile.BadZipFile as err:
        return f"damaged: {err}"
    except Exception as err:  # a damaged header can make zipfile fail in many ways (EOFError, struct.error, ...)
        return f"unreadable ({type(err).__name__}: {err})"
    return None


def set_aside(path: str | Path) -> Path:
    """Move a damaged checkpoint into <its folder>/corrupt/ (never deleted: its bytes may still be rescued);
    returns where it went. A name already taken there gets a number: corrupt/step_00000004.1.pt."""
    path = Path(path)
    folder = path.parent / CORRUPT_FOLDER
    folder.mkdir(exist_ok=True)
    target, number = folder / path.name, 0
    while target.exists():
        number += 1
        target = folder / f"{path.stem}.{number}{path.suffix}"
    path.replace(target)  # a rename within one file system: the bytes are not copied
    return target
