"""treegraft: initialise part of a JAX model's state from another pytree or checkpoint."""

from treegraft._errors import CheckpointError as CheckpointError
from treegraft._errors import CheckpointNotFoundError as CheckpointNotFoundError
from treegraft._errors import GraftError as GraftError
from treegraft._errors import MappingError as MappingError
from treegraft._errors import MismatchError as MismatchError
from treegraft._errors import PathNotFoundError as PathNotFoundError
from treegraft._errors import PathSyntaxError as PathSyntaxError
from treegraft._errors import PathTypeError as PathTypeError
from treegraft._errors import TreeError as TreeError
from treegraft._formats.kauldron.source import KauldronCheckpoint as KauldronCheckpoint
from treegraft._formats.orbax.source import OrbaxCheckpoint as OrbaxCheckpoint
from treegraft._formats.safetensors.source import SafetensorsCheckpoint as SafetensorsCheckpoint
from treegraft._graft import execute as execute
from treegraft._graft import graft as graft
from treegraft._insert.sharding import propagate_sharding as propagate_sharding
from treegraft._loaders import AbstractPartialLoader as AbstractPartialLoader
from treegraft._loaders import InitTransform as InitTransform
from treegraft._loaders import MultiTransform as MultiTransform
from treegraft._loaders import NoopTransform as NoopTransform
from treegraft._loaders import PartialKauldronLoader as PartialKauldronLoader
from treegraft._loaders import SimpleCheckpointLoader as SimpleCheckpointLoader
from treegraft._parse.invert import invert as invert
from treegraft._parse.ops import Operation as Operation
from treegraft._parse.ops import cast as cast
from treegraft._parse.ops import reshape as reshape
from treegraft._parse.ops import stack as stack
from treegraft._parse.ops import transpose as transpose
from treegraft._parse.ops import unstack as unstack
from treegraft._parse.paths import Path as Path
from treegraft._parse.paths import parse_path as parse_path
from treegraft._parse.patterns import Pattern as Pattern
from treegraft._parse.patterns import parse_pattern as parse_pattern
from treegraft._plan import Entry as Entry
from treegraft._plan import GraftPlan as GraftPlan
from treegraft._plan import Problem as Problem
from treegraft._plan import plan as plan
from treegraft._read.source import ReadRequest as ReadRequest
from treegraft._read.source import Source as Source
from treegraft._suggest.result import Suggestion as Suggestion
from treegraft._suggest.suggest import suggest as suggest
from treegraft._tree.pytree import extract as extract
from treegraft._tree.pytree import flatten as flatten
from treegraft._tree.pytree import insert as insert
from treegraft._write.convert import convert as convert
from treegraft._write.convert import save as save

__version__ = "0.1.0"

__all__ = [
    "AbstractPartialLoader",
    "CheckpointError",
    "InitTransform",
    "KauldronCheckpoint",
    "MultiTransform",
    "NoopTransform",
    "OrbaxCheckpoint",
    "PartialKauldronLoader",
    "SafetensorsCheckpoint",
    "SimpleCheckpointLoader",
    "Entry",
    "GraftPlan",
    "Problem",
    "ReadRequest",
    "Source",
    "Operation",
    "cast",
    "execute",
    "graft",
    "invert",
    "plan",
    "reshape",
    "stack",
    "transpose",
    "unstack",
    "propagate_sharding",
    "Suggestion",
    "suggest",
    "CheckpointNotFoundError",
    "GraftError",
    "MappingError",
    "MismatchError",
    "Path",
    "PathNotFoundError",
    "PathSyntaxError",
    "PathTypeError",
    "TreeError",
    "Pattern",
    "extract",
    "flatten",
    "insert",
    "parse_path",
    "parse_pattern",
    "convert",
    "save",
]
