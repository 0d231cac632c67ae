"""What a caption.py run does, decided once before any picture is captioned: the pictures left to caption.

Rank 0 lists the inputs (blip/tool/listing.py) and leaves out what an earlier run did: pictures whose
caption file exists, those an --output FILE holds (after taking in the parts of a killed torchrun run),
and those the journal of an interrupted --existing overwrite/append/prepend run names. Pictures whose
caption files would collide are named and left out. Under torchrun the other processes receive this plan,
so no process lists the folder while another writes into it.
"""

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from blip.tool.listing import Listing, identity, shown
from blip.tool.outputs import Journal, Sidecars, captioned, fold_parts, parts_of, temporary
from blip.tool.shards import list_shards, output_path


@dataclass
class Plan:
    """What a run does, decided once by rank 0 and sent to the other processes: the pictures left to
    caption [(path, the folder it was found in)] (for shard inputs: [(shard, its output)]), how many
    inputs there were and how many already failed (bad arguments, colliding caption files or outputs), the
    exit code when there is nothing to do, and where the journal of a run that changes existing caption
    files is kept."""

    todo: list = field(default_factory=list)
    inputs: int = 0
    failed: int = 0
    stop: int | None = None
    journal: Path | None = None
    earlier: list = field(default_factory=list)  # rank 0 only: FILE's records, kept in front of the new ones


def make_plan(args) -> Plan:
    """Rank 0: list the pictures, and leave out those done before (their caption file exists, FILE holds
    them, or the journal of an interrupted run names them)."""
    if args.shards:
        return shard_plan(args)
    listing = Listing(args.paths, args.hidden)
    for problem in listing.problems:
        print(f"error: {problem}", file=sys.stderr)
    unique = {}
    for path, root in listing.pictures:
        unique.setdefault(identity(path), (path, root))  # a picture named twice is captioned once
    found = list(unique.values())
    plan = Plan(inputs=len(found) + len(listing.problems), failed=len(listing.problems))
    if not found:
        return replace(plan, stop=1)
    if no_checkpoint(args.checkpoint):
        return replace(plan, stop=1)
    if args.sidecar:
        sidecars = Sidecars(args.sidecar, args.existing, args.separator, args.output_dir)
        found, plan.failed = apart(found, sidecars, plan.failed)
        done = set()
        if args.existing != "skip":
            plan.journal = Path(args.output_dir or found[0][1] if found else ".") / \
                f".caption-{args.existing}{sidecars.ext}.journal"
            done = Journal(plan.journal).read()
        for path, root in found:
            if identity(path) in done:
                sidecars.finish(path, root)  # a kill between its journal line and its rename
            elif sidecars.pending(path, root):
                plan.todo.append((path, root))
        for tmp in listing.stale:  # what killed runs left and no journal claims
            tmp.unlink(missing_ok=True)
    elif args.output and args.resume and (Path(args.output).is_file() or parts_of(args.output)):
        fold_parts(Path(args.output), args.format)  # a killed torchrun run's parts, into FILE
        plan.earlier = captioned(Path(args.output), args.format)
        done = {identity(r["image"]) for r in plan.earlier}
        plan.todo = [(path, root) for path, root in found if identity(path) not in done]
    else:
        plan.todo = found
    skipped = len(found) - len(plan.todo)
    if skipped:
        print(f"{skipped} of {len(found)} pictures have their caption already: skipped"
              + (f" (journal {shown(plan.journal)})" if plan.journal and Path(plan.journal).is_file() else ""),
              file=sys.stderr)
    if not plan.todo:
        print("nothing left to caption", file=sys.stderr)
        return replace(plan, stop=1 if plan.failed else 0)
    return plan


def no_checkpoint(folder) -> bool:
    if Path(folder).is_dir():
        return False
    print(f"error: no checkpoint folder at {folder}; make one with "
          f"`python convert_weights.py Salesforce/blip-image-captioning-base {folder}` (docs/checkpoints.md)",
          file=sys.stderr)
    return True


def shard_plan(args) -> Plan:
    """Rank 0, shard inputs: the shards [(shard, its output)] whose output is not yet in --output-dir. Shards
    whose outputs would be one file, or would be the shard itself, are named and left out; the temporary
    outputs of killed runs are removed."""
    shards, problems = list_shards(args.shards)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    plan = Plan(inputs=len(shards) + len(problems), failed=len(problems))
    if not shards:
        return replace(plan, stop=1)
    if no_checkpoint(args.checkpoint):
        return replace(plan, stop=1)
    by_output = {}
    for shard in shards:
        by_output.setdefault(output_path(args.output_dir, shard, args.format), []).append(shard)
    todo, bad = [], 0
    for out, same in by_output.items():
        if len(same) > 1 or identity(out) == identity(same[0]):
            names = " and ".join(shown(s) for s in same)
            print(f"error: {names} would write {'one output' if len(same) > 1 else 'its output over itself'}, "
                  f"{shown(out)}: not captioned; give another --output-dir", file=sys.stderr)
            bad += len(same)
            continue
        temporary(out).unlink(missing_ok=True)  # what a killed run left
        if not out.is_file():
            todo.append((same[0], out))
    plan.failed += bad
    if len(todo) < len(shards) - bad:
        print(f"{len(shards) - bad - len(todo)} of {len(shards)} shards have their output in "
              f"{shown(args.output_dir)} already: skipped", file=sys.stderr)
    if not todo:
        print("nothing left to caption", file=sys.stderr)
        return replace(plan, stop=1 if plan.failed else 0)
    return replace(plan, todo=todo)


def apart(found: list, sidecars: Sidecars, failed: int) -> tuple[list, int]:
    """Pictures whose caption files would be one file are each named and left out; the rest go on."""
    clashing = set()
    for pairs in sidecars.clashes(found):
        names = " and ".join(shown(path) for path, _ in pairs)
        print(f"error: {names} would write one caption file, {shown(sidecars.target(*pairs[0]))}: none of them "
              "is captioned", file=sys.stderr)
        clashing.update(path for path, _ in pairs)
    return [(path, root) for path, root in found if path not in clashing], failed + len(clashing)
