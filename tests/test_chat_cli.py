"""`cogni-mamba chat` and `cogni-mamba generate` as a user runs them: a subprocess fed through a pipe,
and one on a pseudo-terminal that gets Ctrl-C (SIGINT) in the middle of a reply.

The expected replies come from a naive reference: the tokenizer's chat template, greedy decoding by
full recomputation without a cache, cut at the turn-ending ids, decoded to text."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cogni_mamba.config import Config, GenerationConfig, ModelConfig
from cogni_mamba.model import CogniMamba
from cogni_mamba.tokenizer import SimpleTokenizer
from cogni_mamba.train.checkpoint import save_checkpoint
from tests.references import naive_reply

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Be brief."
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}





def cli(*args: str) -> list[str]:
    # fp32 weights: the references below compute in fp32 (auto would pick bf16 on a CPU with native bf16)
    return [sys.executable, "-m", "cogni_mamba", *args, "--dtype", "fp32"]


def make_checkpoint(root: Path, *, max_seq_len: int, silence_specials: bool = False) -> tuple[Path, CogniMamba]:
    tok = SimpleTokenizer()
    torch.manual_seed(0)
    mc = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=128,
                     max_seq_len=max_seq_len, init_std=0.3)  # 0.3: a random model that does not loop on one token
    model = CogniMamba(mc).eval()
    if silence_specials:
        # Zero embedding rows give logit 0 against random positive maxima: greedy never ends the turn.
        with torch.no_grad():
            model.tok_embeddings.weight[256:] = 0
    cfg = Config(model=mc, generation=GenerationConfig(temperature=0.0, max_new_tokens=40))
    return save_checkpoint(root, "step-1", model, cfg, tokenizer=tok), model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run"), max_seq_len=512)


def test_piped_chat_gives_the_expected_transcript(checkpoint, tmp_path):
    ckpt, model = checkpoint
    tok = SimpleTokenizer()
    save = tmp_path / "conv.json"
    script = "\n".join([
        "Hello!",
        "/set max_new_tokens=20",
        "line one\\", "line two",
        '"""', "block a", "", "block b", '"""',
        "/reset",
        "//slash",
        f"/save {save}",
        "/quit",
        "never sent",
    ]) + "\n"
    proc = subprocess.run(cli("chat", "--checkpoint", str(ckpt), "--system", SYSTEM), input=script.encode(),
                          capture_output=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()

    sys_msg = {"role": "system", "content": SYSTEM}
    history, expected = [sys_msg], []
    for message, n in (("Hello!", 40), ("line one\nline two", 20), ("block a\n\nblock b", 20)):
        history.append({"role": "user", "content": message})
        answer = naive_reply(model, tok, history, n)
        history.append({"role": "assistant", "content": answer})
        expected.append(answer + "\n")
        if n == 40:
            expected.append("(settings: max_new_tokens=20 temperature=0.0 top_k=50 top_p=0.95 min_p=None "
                            "repetition_penalty=1.0 seed=None)\n")
    expected.append("(conversation cleared)\n")
    after_reset = [sys_msg, {"role": "user", "content": "/slash"}]
    slash_answer = naive_reply(model, tok, after_reset, 20)
    expected.append(slash_answer + "\n")
    expected.append(f"(saved 3 messages to {save})\n")
    assert len("".join(expected)) > 150  # the replies are not trivially empty
    assert proc.stdout.decode("utf-8") == "".join(expected)
    assert proc.stderr == b""
    saved = json.loads(save.read_text(encoding="utf-8"))
    assert saved["messages"] == [*after_reset, {"role": "assistant", "content": slash_answer}]


def test_generate_prints_the_prompt_and_its_greedy_continuation(checkpoint):
    ckpt, model = checkpoint
    tok = SimpleTokenizer()
    proc = subprocess.run(cli("generate", "--checkpoint", str(ckpt), "--prompt", "Once upon", "--max-new-tokens", "25"),
                          capture_output=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    ids, out = [tok.bos_id, *tok.encode("Once upon")], []
    with torch.no_grad():
        for _ in range(25):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
            ids.append(nxt)
    assert proc.stdout.decode("utf-8") == "Once upon" + tok.decode(out) + "\n"

    # --n 3: one prefill shared by three greedy rows, so three copies of the same continuation.
    proc = subprocess.run(cli("generate", "--checkpoint", str(ckpt), "--prompt", "Once upon", "--max-new-tokens", "25",
                              "--n", "3"), capture_output=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    sample = "Once upon" + tok.decode(out) + "\n"
    assert proc.stdout.decode("utf-8") == "".join(f"--- sample {i} ---\n{sample}" for i in (1, 2, 3))


def test_missing_or_incompatible_checkpoint_is_one_sentence(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    proc = subprocess.run(cli("chat", "--checkpoint", str(tmp_path / "missing")), capture_output=True, env=ENV,
                          timeout=300, input=b"")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(ckpt, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model"]["dim"] = 128
    (broken / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run(cli("generate", "--checkpoint", str(broken), "--prompt", "x"), capture_output=True,
                          env=ENV, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1 and "does not match" in err


# --- Ctrl-C on a pseudo-terminal ------------------------------------------------------------------

class Terminal:
    """A child process on a pseudo-terminal, with a byte buffer of everything it printed."""

    def __init__(self, argv: list[str]):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: become the chat, and never fall back into pytest
            try:
                os.execve(argv[0], argv, ENV)
            finally:
                os._exit(127)
        self.output = b""

    def expect(self, needle: bytes, timeout: float = 120.0, start: int = 0) -> int:
        """Wait until `needle` appears after offset `start`; return the offset just past it."""
        deadline = time.monotonic() + timeout
        while (i := self.output.find(needle, start)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {needle!r}; got {self.output[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    self.output += os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    raise AssertionError(f"child exited before {needle!r}; got {self.output[-500:]!r}") from None
        return i + len(needle)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                with contextlib.suppress(OSError):  # the child closed the terminal
                    self.output += os.read(self.fd, 4096)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        raise AssertionError("the chat did not exit")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_ctrl_c_stops_the_reply_and_the_session_goes_on(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "run", max_seq_len=4096, silence_specials=True)
    term = Terminal(cli("chat", "--checkpoint", str(ckpt), "--max-new-tokens", "4000"))
    try:
        pos = term.expect(b"you> ")
        term.send("hello\n")
        pos = term.expect(b"bot> ", start=pos)
        term.expect(b"", start=pos + 40)  # (b"" is found once 40 bytes have streamed): the reply is under way
        os.kill(term.pid, signal.SIGINT)
        pos = term.expect(b"[stopped]", start=pos)
        pos = term.expect(b"you> ", start=pos)
        save = tmp_path / "c.json"
        term.send(f"/save {save}\n")
        term.expect(b"(saved 3 messages", start=pos)
        term.send("/quit\n")
        assert term.wait() == 0
    finally:
        term.kill()
    reply = json.loads(save.read_text(encoding="utf-8"))["messages"][-1]
    assert reply["role"] == "assistant"
    assert 0 < len(reply["content"].encode()) < 4000  # kept the part shown, stopped long before the end
