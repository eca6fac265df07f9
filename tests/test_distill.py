"""Knowledge distillation: the generalised JSD against trl, the top-K teacher store, the stage on chats and on text,
a tokenizer mismatch refused, and exact resume."""

import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import trainers
from configs import DistillConfig
from loss import generalized_jsd, topk_jsd, topk_logps
from tests.helpers import SFT_MODEL, during_step, make_checkpoint, sample_text
from tokenizer import Tokenizer
from trainers import DistillTrainer, Stopped

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
STUDENT = {**SFT_MODEL, "n_layers": 1}  # half the teacher's blocks


def trl_jsd():
    from trl.experimental.gkd.gkd_trainer import GKDTrainer  # test-only reference; slow to import

    return GKDTrainer.generalized_jsd_loss


def random_logits(seed: int, shape=(3, 9, 40)):
    torch.manual_seed(seed)
    student, teacher = 2 * torch.randn(shape), 3 * torch.randn(shape)
    mask = (torch.rand(shape[:2]) > 0.3).float()
    mask[0] = 0  # a row with nothing to learn
    return student, teacher, mask


# ----------------------------------------------------------------------------- the divergence
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_generalized_jsd_matches_trl(beta, temperature):
    student, teacher, mask = random_logits(0)
    labels = torch.randint(0, 40, mask.shape).masked_fill(mask == 0, -100)
    student.requires_grad_(True)
    ours = generalized_jsd(student, teacher, mask, beta, temperature)
    (grad,) = torch.autograd.grad(ours, student)
    reference = trl_jsd()(student, teacher, labels=labels, beta=beta, temperature=temperature)
    (reference_grad,) = torch.autograd.grad(reference, student)
    assert abs(ours.item() - reference.item()) < 1e-5 and ours.item() > 0
    torch.testing.assert_close(grad, reference_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_jsd_is_the_jsd_over_the_top_k_and_the_rest(beta):
    student, teacher, mask = random_logits(1)
    temperature, k = 1.5, 5
    ids = teacher.topk(k, dim=-1).indices
    stored = topk_logps(teacher, ids, temperature).half()  # as the store keeps them
    ours = topk_jsd(student, ids, stored, mask, beta, temperature)

    def coarse(logits):  # reference: the K probabilities and the rest, summed by hand
        p = F.softmax(logits.double() / temperature, -1)
        top = p.gather(-1, ids)
        return torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1).log().float()

    labels = torch.zeros(mask.shape, dtype=torch.long).masked_fill(mask == 0, -100)
    reference = trl_jsd()(coarse(student), coarse(teacher), labels=labels, beta=beta, temperature=1.0)
    assert abs(ours.item() - reference.item()) < 2e-3  # the teacher's log-probs were stored in float16
    # With K = the whole vocabulary nothing is left out: the full divergence.
    every = torch.arange(40).expand(*mask.shape, 40)
    full = topk_jsd(student, every, topk_logps(teacher, every, temperature), mask, beta, temperature)
    assert abs(full.item() - generalized_jsd(student, teacher, mask, beta, temperature).item()) < 1e-5


# ----------------------------------------------------------------------------- the stage
@pytest.fixture
def distill_dirs(sft_dirs, tokenizer):
    make_checkpoint(sft_dirs / "teacher", tokenizer, "sft")
    return sft_dirs


def distill_config(d, **kw) -> DistillConfig:
    return DistillConfig(**{**dict(data_dir=str(d), out_dir=str(d / "distill"), teacher=str(d / "teacher"),
                                   sft_data=str(d / "train.jsonl"), sft_val_data=str(d / "val.jsonl"), device="cpu",
                                   batch_size=8, max_steps=12, warmup_steps=2, lr=3e-3, eval_iters=2,
                                   log_interval=4, save_interval=6, eval_samples=0, temperature=2.0), **kw})


def test_the_loss_is_alpha_ce_plus_t2_jsd_on_the_assistant_tokens(distill_dirs):
    trainer = DistillTrainer(distill_config(distill_dirs, alpha=0.3), STUDENT)
    assert trainer.model.num_params() < trainer.teacher.num_params()
    batch = trainer.next_batch()
    loss, metrics = trainer.compute_loss(trainer.model, batch)
    student, teacher = trainer.model(batch["input_ids"]), trainer.teacher(batch["input_ids"])
    mask = batch["loss_mask"]
    labels = batch["labels"].masked_fill(mask == 0, -100)
    ce = F.cross_entropy(student.transpose(1, 2), labels)
    jsd = trl_jsd()(student, teacher, labels=labels, beta=0.5, temperature=2.0)
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * 4 * jsd)
    torch.testing.assert_close(metrics["divergence"], jsd)
    assert not any(p.requires_grad for p in trainer.teacher.parameters()) and not trainer.teacher.training


def test_distillation_on_text_pulls_the_student_to_the_teacher(data_dir, tmp_path, tokenizer):
    make_checkpoint(tmp_path / "teacher", tokenizer, "pretrain", max_seq_len=32)
    cfg = distill_config(tmp_path, data="text", data_dir=str(data_dir), seq_len=32, max_steps=30, lr=1e-2,
                         alpha=0.0, eval_interval=30)
    trainer = DistillTrainer(cfg, {**STUDENT, "max_seq_len": 32})
    batch = trainer.next_batch()
    assert batch["loss_mask"].all() and batch["input_ids"].shape == (8, 32)
    before = trainer.evaluate()
    after = trainer.train()
    assert after["val_divergence"] < before["val_divergence"] / 2, (before, after)


def test_the_teacher_top_k_is_stored_once_then_the_teacher_is_freed(distill_dirs, monkeypatch):
    live = DistillTrainer(distill_config(distill_dirs), STUDENT)
    stored = DistillTrainer(distill_config(distill_dirs, teacher_topk=live.tokenizer.vocab_size), STUDENT)
    assert stored.teacher is None and set(stored.stored) == {"train", "val"}
    # With K = the vocabulary the stored teacher is the teacher, up to its float16 log-probs.
    assert stored.evaluate()["val_divergence"] == pytest.approx(live.evaluate()["val_divergence"], rel=2e-3)
    k = 4
    small = DistillTrainer(distill_config(distill_dirs, teacher_topk=k), STUDENT)
    indices = [3, 0, 7]
    batch = small.batch_of("train", indices)
    logits = live.teacher(batch["input_ids"])
    trained = batch["loss_mask"] != 0
    assert torch.equal(batch["teacher_ids"][trained], logits.topk(k).indices[trained])
    expected = topk_logps(logits, logits.topk(k).indices, temperature=2.0)
    torch.testing.assert_close(batch["teacher_logps"][trained], expected[trained], atol=1e-2, rtol=1e-3)
    assert not batch["teacher_ids"][~trained].any()
    files = sorted(p.name for p in (distill_dirs / ".cache").iterdir() if ".teacher-top4-" in p.name)
    assert len(files) == 2  # train and val, beside the chats' token caches
    monkeypatch.setattr(trainers, "write_store", lambda *a, **kw: pytest.fail("the store was built again"))
    DistillTrainer(distill_config(distill_dirs, teacher_topk=k, out_dir=str(distill_dirs / "again")), STUDENT)


@pytest.mark.parametrize("topk", [0, 8])
def test_distillation_resumes_exactly(distill_dirs, topk):
    def run(out, **kw):
        return DistillTrainer(distill_config(distill_dirs, out_dir=str(distill_dirs / out), teacher_topk=topk, **kw),
                              STUDENT)

    whole = run("whole").train()
    crashing = run("resumed")
    during_step(crashing, 7, lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C in step 7: saved at step 8
    with pytest.raises(Stopped):
        crashing.train()
    resumed = run("resumed", resume=True, teacher=str(distill_dirs / "not-read-when-resuming"))
    assert resumed.step == 8 and resumed.teacher_dir == str(distill_dirs / "teacher")
    assert resumed.train() == whole


def test_another_tokenizer_is_refused_in_one_line(distill_dirs, tokenizer):
    other = Tokenizer.train([t.upper() for t in sample_text()], vocab_size=300)
    make_checkpoint(distill_dirs / "student", other, "pretrain")
    cfg = distill_config(distill_dirs, init_from=str(distill_dirs / "student"))
    with pytest.raises(ValueError, match="another tokenizer than the teacher"):
        DistillTrainer(cfg, {})
    out = subprocess.run([sys.executable, "train_distill.py", "--init_from", str(distill_dirs / "student"),
                          "--teacher", str(distill_dirs / "teacher"), "--sft_data", str(distill_dirs / "train.jsonl"),
                          "--out_dir", str(distill_dirs / "distill"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.startswith("error: the student") and out.stderr.count("\n") == 1


def test_bad_settings_are_refused_before_loading(tmp_path):
    for bad, match in ((dict(beta=1.5), "--beta"), (dict(alpha=-0.1), "--alpha"), (dict(data="web"), "--data"),
                       (dict(teacher_topk=4, pack=True), "--pack"), (dict(temperature=0), "--temperature")):
        with pytest.raises(ValueError, match=match):
            DistillTrainer(distill_config(tmp_path, **bad), {})  # tmp_path holds no teacher: nothing was loaded
