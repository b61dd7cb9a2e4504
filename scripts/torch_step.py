#!/usr/bin/env python3
"""One PyTorch training step of ResNet-20, VGG-16 (CIFAR-10), the PTB LSTM language model or the
AN4 acoustic model, timed, to set beside our trainer (`gtopk bench step`, scripts/bench-vs-torch.sh).

A step is forward, cross-entropy, backward, SGD (lr 0.1, momentum 0.9, weight decay 1e-4 on every
parameter) on synthetic data made once on the device, so data loading is not timed. --batch is the
total batch B (our train.batch_size = P b). With --workers P, P replicas (copies of one model, so
they start equal) each step on B/P samples one after another, as our "P workers on one GPU" mode;
aggregation is dense and simple: sum the P gradients, divide by P, copy the mean back into every
replica; then each replica runs its own optimizer step. The replicas stay equal apart from BN
running statistics. Phases are timed with CUDA events (perf_counter on CPU); medians over --steps
iterations after --warmup. The phase medians need not add up to the iteration median exactly.
Prints one JSON line on stdout and a short table on stderr.
"""
import argparse
import copy
import json
import statistics
import sys
import time

PARAMS = {"resnet20": 269_722, "vgg16": 14_728_266}  # what our Rust models have; asserted below
MODELS = sorted(PARAMS) + ["lstm-ptb", "lstm-an4"]


def build(name, nn, torch):
    """The two models, laid out as src/models/resnet20.rs and src/models/vgg16.rs."""

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv_a = conv3x3(cin, cout, stride)
            self.bn_a = nn.BatchNorm2d(cout)
            self.conv_b = conv3x3(cout, cout, 1)
            self.bn_b = nn.BatchNorm2d(cout)
            # Option A: subsample by 2 and pad with zero channels, so shortcuts add no parameters.
            self.extra = cout - cin if (stride != 1 or cin != cout) else None

        def forward(self, x):
            y = torch.relu(self.bn_a(self.conv_a(x)))
            y = self.bn_b(self.conv_b(y))
            if self.extra is not None:
                x = x[:, :, ::2, ::2]
                x = torch.cat([x, x.new_zeros(x.shape[0], self.extra, *x.shape[2:])], 1)
            return torch.relu(x + y)

    def conv3x3(cin, cout, stride):
        c = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        nn.init.normal_(c.weight, 0.0, (2.0 / (9 * cout)) ** 0.5)  # the authors' (and our) init
        return c

    class ResNet20(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.conv_1_3x3 = conv3x3(3, 16, 1)
            self.bn_1 = nn.BatchNorm2d(16)
            blocks, cin = [], 16
            for s, w in enumerate((16, 32, 64)):
                for i in range(3):
                    blocks.append(BasicBlock(cin, w, 2 if s > 0 and i == 0 else 1))
                    cin = w
            self.blocks = nn.Sequential(*blocks)
            self.classifier = nn.Linear(64, classes)
            nn.init.kaiming_normal_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

        def forward(self, x):
            y = self.blocks(torch.relu(self.bn_1(self.conv_1_3x3(x))))
            return self.classifier(y.mean((2, 3)))

    class Vgg16(nn.Module):
        # 13 conv3x3 with bias + BN + ReLU, 2x2 max-pools ('M'), then 512 -> 10; PyTorch's default init.
        PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

        def __init__(self, classes=10):
            super().__init__()
            layers, cin = [], 3
            for c in self.PLAN:
                if c == "M":
                    layers.append(nn.MaxPool2d(2))
                else:
                    layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                    cin = c
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(512, classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.features(x), 1))

    return {"resnet20": ResNet20, "vgg16": Vgg16}[name]()


def build_sequence(name, a, nn, torch):
    """src/models/ptb_lm.rs and src/models/deepspeech.rs, with a's sizes, and a loss over a batch of
    synthetic inputs: returns (model, make_batch(b) -> inputs, loss(model, inputs) -> scalar)."""
    F = torch.nn.functional
    if name == "lstm-ptb":
        class PtbLm(nn.Module):
            def __init__(self):
                super().__init__()
                self.word_embeddings = nn.Embedding(a.vocab, a.hidden)
                self.lstm = nn.LSTM(a.hidden, a.hidden, a.layers, dropout=a.dropout)
                self.sm_fc = nn.Linear(a.hidden, a.vocab)
                self.drop = nn.Dropout(a.dropout)

            def forward(self, tokens):  # [T, B] -> [T * B, V]
                out, _ = self.lstm(self.drop(self.word_embeddings(tokens)))
                return self.sm_fc(self.drop(out)).flatten(0, 1)

        def batch(b, dev):
            return torch.randint(0, a.vocab, (a.seq_len + 1, b), device=dev)

        def loss(m, tokens):
            return F.cross_entropy(m(tokens[:-1]), tokens[1:].flatten())

        return PtbLm(), batch, loss

    ch, bins, context, classes = a.conv_channels, 161, 20, 29

    class DeepSpeech(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(1, ch, (41, 11), (2, 2), (20, 5)), nn.BatchNorm2d(ch), nn.Hardtanh(0, 20),
                nn.Conv2d(ch, ch, (21, 11), (2, 1), (10, 5)), nn.BatchNorm2d(ch), nn.Hardtanh(0, 20))
            f1 = (bins + 40 - 41) // 2 + 1
            f2 = (f1 + 20 - 21) // 2 + 1
            ins = [ch * f2] + [a.hidden] * (a.layers - 1)
            self.norms = nn.ModuleList([nn.Identity()] + [nn.BatchNorm1d(d) for d in ins[1:]])
            self.rnns = nn.ModuleList([nn.LSTM(d, a.hidden) for d in ins])
            self.lookahead = nn.Conv1d(a.hidden, a.hidden, context + 1, groups=a.hidden, bias=False)
            self.fc_bn = nn.BatchNorm1d(a.hidden)
            self.fc = nn.Linear(a.hidden, classes, bias=False)

        def forward(self, x):  # [N, 1, bins, T] -> log-probabilities [T', N, classes]
            y = self.conv(x)
            n, c, f, t = y.shape
            h = y.reshape(n, c * f, t).permute(2, 0, 1)
            for norm, rnn in zip(self.norms, self.rnns):
                if not isinstance(norm, nn.Identity):
                    h = norm(h.reshape(t * n, -1)).reshape(t, n, -1)
                h, _ = rnn(h)
            la = self.lookahead(F.pad(h.permute(1, 2, 0), (0, context)))  # [N, H, T]
            h = F.hardtanh(la, 0, 20).permute(2, 0, 1)
            z = self.fc_bn(h.reshape(t * n, -1))
            return F.log_softmax(self.fc(z).reshape(t, n, -1), 2)

    def batch(b, dev):
        x = torch.randn(b, 1, bins, a.frames, device=dev)
        labels = torch.randint(1, classes, (b, a.labels), device=dev)
        return x, labels

    def loss(m, inputs):
        x, labels = inputs
        logp = m(x)
        t, n = logp.shape[0], logp.shape[1]
        return F.ctc_loss(logp, labels, torch.full((n,), t, dtype=torch.long),
                          torch.full((n,), labels.shape[1], dtype=torch.long), zero_infinity=True)

    return DeepSpeech(), batch, loss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--batch", type=int, default=128, help="total batch B over all workers")
    ap.add_argument("--steps", type=int, default=50, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--workers", type=int, default=1, help="P replicas on one device, B/P each")
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in matmul and cuDNN (off: exact fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's choice)")
    seq = ap.add_argument_group("lstm-ptb and lstm-an4 sizes (configs/lstm_*_synthetic.toml)")
    seq.add_argument("--hidden", type=int, default=256)
    seq.add_argument("--layers", type=int, default=2)
    seq.add_argument("--vocab", type=int, default=1000)
    seq.add_argument("--seq-len", type=int, default=35)
    seq.add_argument("--dropout", type=float, default=0.2)
    seq.add_argument("--conv-channels", type=int, default=8)
    seq.add_argument("--frames", type=int, default=100, help="lstm-an4: spectrogram frames per utterance")
    seq.add_argument("--labels", type=int, default=10, help="lstm-an4: CTC target length")
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.workers < 1 or a.batch < 1:
        ap.error("need --steps >= 1, --warmup >= 0, --workers >= 1, --batch >= 1")
    if a.batch % a.workers:
        ap.error(f"--batch {a.batch} is not divisible by --workers {a.workers}")

    try:
        import torch
        from torch import nn
    except ImportError as e:
        print(f"torch_step.py: PyTorch is not importable ({e})", file=sys.stderr)
        return 1
    if a.device == "cuda" and not torch.cuda.is_available():
        print("torch_step.py: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 1

    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    # cuDNN enables TF32 convolutions by default; set both switches so "off" really means fp32.
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    P, b = a.workers, a.batch // a.workers

    if a.model in PARAMS:
        model = build(a.model, nn, torch)
        make_batch = lambda b, dev: (torch.randn(b, 3, 32, 32, device=dev), torch.randint(0, 10, (b,), device=dev))
        loss_of = lambda m, xy: nn.functional.cross_entropy(m(xy[0]), xy[1])
    else:
        model, make_batch, loss_of = build_sequence(a.model, a, nn, torch)
    n_params = sum(p.numel() for p in model.parameters())
    if a.model in PARAMS:
        assert n_params == PARAMS[a.model], f"{a.model}: {n_params} parameters, ours has {PARAMS[a.model]}"
    # deepcopy so every replica starts from the same weights, as our workers do from one seed.
    replicas = [model.to(dev).train()] + [copy.deepcopy(model) for _ in range(P - 1)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in replicas]
    data = [make_batch(b, dev) for _ in range(P)]

    def now():
        """A timestamp: a recorded CUDA event (read after the sync) or a CPU clock."""
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def secs(t0, t1):
        return t0.elapsed_time(t1) / 1e3 if cuda else t1 - t0

    def iteration():
        t0 = now()
        for m, inputs in zip(replicas, data):  # compute: fwd + bwd, replicas one after another
            m.zero_grad(set_to_none=False)
            loss_of(m, inputs).backward()
        t1 = now()
        if P > 1:  # aggregation: dense mean of the P gradients, copied into every replica
            grads = [[p.grad for p in m.parameters()] for m in replicas]
            mean = [g.clone() for g in grads[0]]
            for g in grads[1:]:
                torch._foreach_add_(mean, g)
            torch._foreach_div_(mean, float(P))
            for g in grads:
                for dst, src in zip(g, mean):
                    dst.copy_(src)
        t2 = now()
        for o in opts:  # optimizer: every replica applies the same mean gradient
            o.step()
        t3 = now()
        if cuda:
            t3.synchronize()  # one sync per iteration, after everything is queued
        return secs(t0, t3), secs(t0, t1), secs(t1, t2), secs(t2, t3)

    for _ in range(a.warmup):
        iteration()
    rows = [iteration() for _ in range(a.steps)]
    med = [statistics.median(col) for col in zip(*rows)]

    out = {
        "model": a.model, "params": n_params, "device": a.device,
        "gpu": torch.cuda.get_device_name(dev) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "batch": a.batch, "workers": P, "batch_per_worker": b, "threads": torch.get_num_threads(), "steps": a.steps, "warmup": a.warmup,
        "cudnn_benchmark": a.cudnn_benchmark, "tf32": a.tf32, "aggregation": "dense mean (sum/P)",
        "median_iter_s": med[0], "samples_per_s": a.batch / med[0],
        "compute_s": med[1], "aggregation_s": med[2], "optimizer_s": med[3],
        "peak_mem_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
    }
    print(json.dumps(out), flush=True)

    gpu = f" ({out['gpu']})" if cuda else ""
    print(f"torch {torch.__version__} {a.model} on {a.device}{gpu}: B={a.batch}, P={P} x b={b}, "
          f"cudnn.benchmark={a.cudnn_benchmark}, tf32={a.tf32}, median of {a.steps} after {a.warmup} warm-up",
          file=sys.stderr)
    for name, v in zip(("iteration", "  compute (fwd+bwd)", "  aggregation", "  optimizer"), med):
        print(f"{name:<20} {v * 1e3:10.3f} ms  {100 * v / med[0]:5.1f} %", file=sys.stderr)
    print(f"{'throughput':<20} {out['samples_per_s']:10.1f} samples/s", file=sys.stderr)
    if cuda:
        print(f"{'peak memory':<20} {out['peak_mem_bytes'] / 2**20:10.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
