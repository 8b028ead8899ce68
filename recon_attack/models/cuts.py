"""Where a victim is cut into the device's half (the encoder) and the server's (the tail): at any node of its traced
graph (torchvision's feature-extraction node names) that every path from the image to the logits passes through,
so that the tensor it computes is the only thing the server's half needs. A module's name stands for its last node;
the names this tool used before graph cuts (layer2, block6, block13_expand) stay aliases."""
import dataclasses
import functools
from typing import NamedTuple

import torch
from torch import fx
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from ..utils import UsageError
from .layouts import layout_of

# The cuts this tool named before it cut graphs, by arch: name -> the module (or node) it is. block13_expand is the
# original work's cut: MobileNetV3-Large inside block 13, after its 1x1 expansion (672 channels at stride 16).
RESNET_ALIASES = {f'layer{i}': f'layer{i}' for i in range(1, 5)}
ALIASES = {'resnet18': RESNET_ALIASES, 'resnet34': RESNET_ALIASES, 'resnet50': RESNET_ALIASES,
           'mobilenet_v2': {f'block{i}': f'features.{i}' for i in (3, 6, 10, 13, 16)},
           'mobilenet_v3_large': {'block3': 'features.3', 'block6': 'features.6', 'block12': 'features.12',
                                  'block13_expand': 'features.13.block.0', 'block15': 'features.15'}}
DEFAULT_SPLIT = {'resnet18': 'layer2', 'resnet34': 'layer2', 'resnet50': 'layer2',
                 'mobilenet_v2': 'block6', 'mobilenet_v3_large': 'block13_expand'}
SPLITS = {arch: tuple(aliases) for arch, aliases in ALIASES.items()}  # the named cuts, listed in --help


class Cut(NamedTuple):
    """A victim's cut as the flag checks name it: 'resnet18 cut at layer2', the channels of its tensor (None where it
    has none: a vector), and its layout's kind."""
    name: str
    channels: int
    layout: str = 'map'


class Graph:
    """A classifier traced into its graph (eval mode): each node's name (torchvision's, in execution order), the
    fx node it is, and which nodes cut the network in two."""

    def __init__(self, net, what):
        self.what = what
        try:
            _, self.names = get_graph_node_names(net, suppress_diff_warning=True)
            self.module = create_feature_extractor(net, return_nodes={name: name for name in self.names})
        except Exception as e:  # torch.fx cannot follow data-dependent control flow, among other things
            raise UsageError(f'{what}: torch.fx cannot trace it ({type(e).__name__}: {str(e).splitlines()[0]}); '
                             'make its forward traceable (no control flow on tensor values) to cut it') from None
        self.nodes = next(n for n in self.module.graph.nodes if n.op == 'output').args[0]
        self.input, self.logits = self.nodes[self.names[0]], self.nodes[self.names[-1]]

    @functools.cached_property
    def separators(self):
        """The names of the nodes every path from the image to the logits passes through, in order. In the
        graph's topological order a node separates them exactly when no edge between two nodes on such paths jumps
        over it."""
        order = {node: i for i, node in enumerate(self.module.graph.nodes)}
        on_paths = descendants(self.input) & (ancestors(self.logits) | {self.logits})
        crossing = [0] * (len(order) + 1)
        for node in on_paths:
            for user in node.users:
                if user in on_paths and order[user] > order[node] + 1:
                    crossing[order[node] + 1] += 1
                    crossing[order[user]] -= 1
        covered, running = {}, 0
        for i, count in enumerate(crossing):
            running += count
            covered[i] = running
        return [name for name in self.names[1:-1]
                if self.nodes[name] in on_paths and not covered[order[self.nodes[name]]]]

    def node_name(self, split, aliases=None):
        """The node `split` names: an alias, a node, or a module (its last node)."""
        aliases = aliases or {}
        name = aliases.get(split, split)
        if name in self.nodes:
            return name
        inside = [n for n in self.names if n.startswith(name + '.')]
        if inside:
            return inside[-1]
        if aliases:
            raise UsageError(f"argument --split: invalid choice for {self.what}: '{split}' (choose from "
                             f"{', '.join(aliases)}, or a node or module --list_splits lists)")
        close = [n for n in self.names if split in n][:3]
        raise UsageError(f'--split {split}: no such node or module in {self.what}\'s graph'
                         + (f' (nodes named like it: {", ".join(close)})' if close else '')
                         + '; --list_splits lists the cuts')

    def check(self, split, aliases=None):
        """The node `split` names, refused with one line where it does not cut the network in two (the server's
        half would need more than the tensor sent), naming the nearest legal cuts."""
        name = self.node_name(split, aliases)
        if name not in self.separators:
            position, modules = self.names.index(name), self.module_names()
            before = [modules.get(n, n) for n in self.separators if self.names.index(n) < position][-1:]
            after = [modules.get(n, n) for n in self.separators if self.names.index(n) > position][:1]
            raise UsageError(f'--split {split}: the network is not cut in two at {name} (the server\'s half would '
                             f'need an earlier tensor too, e.g. a skip connection); the nearest cuts are '
                             f'{" and ".join(before + after) or "none"} (--list_splits lists them all)')
        return name

    def halves(self, name, root=None):
        """(encoder, tail): GraphModules sharing the weights of `root` (a network of the traced architecture; default
        the one traced), the image -> the node's tensor, and that tensor -> the logits."""
        cut = self.nodes[name]
        sent = ancestors(cut) & descendants(self.input) | {cut}
        encoder = self.subgraph(root, {self.input: 'x'}, ancestors(cut) | {cut}, cut)
        tail = self.subgraph(root, {cut: 'sent'}, (ancestors(self.logits) | {self.logits}) - sent, self.logits)
        return encoder, tail

    def subgraph(self, root, inputs, keep, output):
        graph, copied = fx.Graph(), {}
        for node in self.module.graph.nodes:
            if node in inputs:
                copied[node] = graph.placeholder(inputs[node])
            elif node in keep:
                copied[node] = graph.node_copy(node, lambda arg: copied[arg])
        graph.output(copied[output])
        return fx.GraphModule(self.module if root is None else root, graph)

    def module_names(self):
        """Each node's shortest module name that stands for it (the module whose last node it is), else itself."""
        last = {}
        for name in self.names:
            parts = name.split('.')
            for k in range(1, len(parts)):
                last['.'.join(parts[:k])] = name
        shortest = {}
        for module, name in last.items():
            if name not in shortest or len(module) < len(shortest[name]):
                shortest[name] = module
        return shortest


def ancestors(node):
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def descendants(node):
    seen, stack = {node}, list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen and n.op != 'output':
            seen.add(n)
            stack.extend(n.users)
    return seen


class CutInfo(NamedTuple):
    """A legal cut as --list_splits shows it: its node, the module name that stands for it, the shape of the tensor
    it sends (no batch), and its layout."""
    node: str
    module: str
    shape: tuple
    layout: object


def probe(victim, image_size):
    """The legal cuts of a victim (a config.VictimConfig) at `image_size`, traced on the meta device (no weights, no
    compute; on the CPU for an architecture that cannot be built without data): [CutInfo] in order, and the Graph,
    for the flag checks, --list_splits and the cut itself. Traced once per architecture and size in a process. A
    size the network does not run at is refused in one line that names sizes it runs at."""
    return probe_architecture(dataclasses.replace(victim, split=None, pretrained=False, weights=None, seed=0,
                                                  reference=None), image_size)


@functools.lru_cache(maxsize=16)
def probe_architecture(victim, image_size):
    try:
        graph, outputs = traced_run(victim, image_size)
    except UsageError:
        raise
    except Exception as e:
        sizes = [size for size in CANDIDATE_SIZES if size != image_size and runs_at(victim, size)][:4]
        works = ', '.join(map(str, sizes)) or 'none of ' + ', '.join(map(str, CANDIDATE_SIZES))
        raise UsageError(f'--image_size {image_size}: {victim_name(victim)} does not run at {image_size} px '
                         f'({type(e).__name__}: {str(e).splitlines()[0][:120]}); it runs at {works} px') from None
    modules, cuts = graph.module_names(), []
    for name in graph.separators:
        value = outputs[name]
        layout = layout_of(tuple(value.shape[1:])) if isinstance(value, torch.Tensor) and value.ndim else None
        if layout is not None:
            cuts.append(CutInfo(name, modules.get(name, name), tuple(value.shape[1:]), layout))
    return cuts, graph


CANDIDATE_SIZES = (32, 64, 96, 128, 160, 224, 256, 299, 320)  # what a refused --image_size is told to try


def traced_run(victim, image_size):
    """(Graph, every node's output) of the victim's network run on one zero image of `image_size` pixels, on the meta
    device where the architecture can be built there (else on the CPU)."""
    from .victims import network  # the victims build networks; the cuts only trace them
    try:
        with torch.device('meta'):
            net, device = network(victim, image_size, meta=True), 'meta'
    except UsageError:
        raise
    except Exception:  # an architecture built from data (RegNet) cannot be built on the meta device
        net, device = network(victim, image_size, meta=True), 'cpu'
    graph = Graph(net, victim_name(victim))
    with torch.no_grad():
        return graph, graph.module(torch.zeros(1, 3, image_size, image_size, device=device))


def runs_at(victim, image_size):
    try:
        traced_run(victim, image_size)
        return True
    except Exception:
        return False


def victim_name(victim):
    return victim.model or victim.arch


def aliases_of(victim):
    return {} if victim.model else ALIASES.get(victim.arch, {})


def default_split(victim, image_size):
    """The cut --split defaults to: the one this tool always used for the five archs it named cuts of, else the
    legal cut nearest the middle of the graph."""
    if not victim.model and victim.arch in DEFAULT_SPLIT:
        return DEFAULT_SPLIT[victim.arch]
    cuts, graph = probe(victim, image_size)
    named = [cut for cut in cuts if cut.module != cut.node] or cuts  # the last nodes of modules, where there are
    if not named:
        raise UsageError(f'{victim_name(victim)}: no node cuts its graph in two (every tensor skips another)')
    middle = len(graph.names) / 2
    return min(named, key=lambda cut: abs(graph.names.index(cut.node) - middle)).module


def cut_of(victim, image_size):
    """(CutInfo of the victim's --split, the Graph), its node checked (one line where it does not cut)."""
    cuts, graph = probe(victim, image_size)
    name = graph.check(victim.split, aliases_of(victim))
    found = [cut for cut in cuts if cut.node == name]
    if not found:
        raise UsageError(f'--split {victim.split}: {name} does not send a tensor the tool can read (a vector, token '
                         'sequence or feature map)')
    return found[0], graph


def cut_at(victim, image_size):
    """The victim's cut as the flag checks name it (a Cut)."""
    info, _ = cut_of(victim, image_size)
    return Cut(f'{victim_name(victim)} cut at {victim.split}', info.layout.channels(info.shape), info.layout.kind)


def probe_feature_shape(victim, image_size):
    """The shape (no batch) of the tensor the victim's cut sends at `image_size`."""
    return cut_of(victim, image_size)[0].shape


def check_cut(victim, image_size):
    """A cut that does not cut the network in two, or an image size the victim does not run at, caught before
    anything is built."""
    cut_of(victim, image_size)


def list_splits(victim, image_size):
    """--list_splits: every legal cut, the shape it sends, its size relative to the image, and the default."""
    cuts, graph = probe(victim, image_size)
    default = graph.node_name(default_split(victim, image_size), aliases_of(victim))
    names = {node: alias for alias, node in ((a, graph.node_name(a, aliases_of(victim))) for a in aliases_of(victim))}
    pixels = 3 * image_size * image_size
    lines = [f'{victim_name(victim)} at {image_size} px: {len(cuts)} cuts (--split NAME; a module stands for its last '
             'node)']
    for cut in cuts:
        size = torch.Size(cut.shape).numel() / pixels
        alias = f', alias {names[cut.node]}' if cut.node in names else ''
        node = '' if cut.module == cut.node else f' [{cut.node}]'
        marker = '  (default)' if cut.node == default else ''
        lines.append(f'  {cut.module}{node}: {"x".join(map(str, cut.shape))} {cut.layout.kind}, {size:.3g} of the '
                     f'image{alias}{marker}')
    return '\n'.join(lines)


def cut(net, victim, image_size):
    """(encoder, tail) of the network at the victim's --split (checked), sharing the network's weights: built from
    its architecture's graph traced at `image_size`, or from the network traced itself where that graph holds
    constants of its own (a tensor its forward creates)."""
    graph = probe(victim, image_size)[1]
    name = graph.check(victim.split, aliases_of(victim))
    try:
        return graph.halves(name, net)
    except AttributeError:
        graph = Graph(net, victim_name(victim))
        return graph.halves(graph.check(victim.split, aliases_of(victim)))
