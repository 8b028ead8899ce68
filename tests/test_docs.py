"""The README and docs/ agree with the flags, and --help reads as a newcomer needs it."""
import contextlib
import io
import pathlib
import re

import pytest

import bench
import main as cli
from conftest import ROOT

DOCS = [pathlib.Path(ROOT) / 'README.md', *sorted((pathlib.Path(ROOT) / 'docs').glob('*.md'))]
FLAG = re.compile(r'(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]')
OTHER_TOOLS = {'--nproc_per_node', '--logdir'}  # torchrun's and tensorboard's, named in docs/


def help_text(entry):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        entry(['--help'])
    return out.getvalue()


def test_every_flag_the_readme_and_docs_name_exists():
    extending = (pathlib.Path(ROOT) / 'docs' / 'extending.md').read_text()
    example = ''.join(re.findall(r'```python\n(.*?)```', extending, re.S))  # the flag of its example defence
    known = set(FLAG.findall(help_text(cli.main) + help_text(bench.main) + example)) | OTHER_TOOLS
    unknown = {f'{doc.name}: {flag}' for doc in DOCS for flag in FLAG.findall(doc.read_text()) if flag not in known}
    assert not unknown, sorted(unknown)


def heading_anchors(markdown):
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r'[^\w -]', '', title.strip().lower()).replace(' ', '-')
            for title in re.findall(r'^#+ (.*)$', markdown, re.M)}


def test_every_doc_the_readme_links_exists():
    readme = DOCS[0].read_text()
    links = re.findall(r'\]\(((?:docs/)?[\w./-]+\.(?:md|png|cff)|LICENSE)(?:#([\w-]+))?\)', readme)
    assert len(links) >= 8 and all((pathlib.Path(ROOT) / link).exists() for link, _ in links), links
    for link, anchor in links:
        if anchor:
            assert anchor in heading_anchors((pathlib.Path(ROOT) / link).read_text()), (link, anchor)


def test_help_prints_each_default_once_and_lists_the_cuts():
    for entry in (cli.main, bench.main):
        text = ' '.join(help_text(entry).split())
        assert '(default: None)' not in text and '(default: False)' not in text, entry
        assert not re.search(r'default[^()]*\) \(default:', text), entry  # never twice
        assert '(default: 0.0)' in text or entry is bench.main  # a default of zero is a default too
    text = help_text(cli.main)
    assert 'mobilenet_v2: block3 block6 block10 block13 block16 (default block6)' in ' '.join(text.split())
    assert '--train_defence' in text.split('trained defences')[0]  # among the modes
    assert 'examples:' in text


def test_no_flag_prints_a_short_usage_and_where_to_start(capsys):
    cli.main([])
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 4 and 'start with:' in out and 'python main.py --help' in out
