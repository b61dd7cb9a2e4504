//! The fused BatchNorm against PyTorch (a committed fixture), against candle's BatchNorm (the op it
//! replaces) on random shapes, against finite differences, and across thread counts.

use super::*;
use crate::rng::Rng;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;

fn random(rng: &mut Rng, shape: &[usize], scale: f32, offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() * scale + offset).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn var(vm: &VarMap, name: &str) -> Var {
    vm.data().lock().unwrap()[name].clone()
}

/// A BatchNorm of `c` channels named `bn`, with the given weight and bias.
fn layer(c: usize, weight: &Tensor, bias: &Tensor) -> (VarMap, BatchNorm) {
    let vm = VarMap::new();
    let bn = BatchNorm::new(&Builder::new(&vm, 0, &Device::Cpu).pp("bn"), c).unwrap();
    var(&vm, "bn.weight").set(weight).unwrap();
    var(&vm, "bn.bias").set(bias).unwrap();
    (vm, bn)
}

/// Output, running mean, running var and the gradients of x, weight and bias of loss = sum(y * r),
/// through either our op or candle's composed BatchNorm (+ ReLU).
fn run(c: usize, x: &Tensor, r: &Tensor, weight: &Tensor, bias: &Tensor, relu: bool, ours: bool) -> Vec<Tensor> {
    let (vm, bn) = layer(c, weight, bias);
    let x = Var::from_tensor(x).unwrap();
    let y = if ours {
        bn.run(x.as_tensor(), true, relu).unwrap()
    } else {
        let y = bn.library.forward_t(x.as_tensor(), true).unwrap();
        if relu {
            y.relu().unwrap()
        } else {
            y
        }
    };
    let grads = (&y * r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .map_err(|e| e.to_string())
        .unwrap();
    let g = |t: &Tensor| grads.get(t).unwrap().clone();
    vec![
        y.clone(),
        var(&vm, "bn.running_mean").as_tensor().copy().unwrap(),
        var(&vm, "bn.running_var").as_tensor().copy().unwrap(),
        g(x.as_tensor()),
        g(var(&vm, "bn.weight").as_tensor()),
        g(var(&vm, "bn.bias").as_tensor()),
    ]
}

const WHAT: [&str; 6] = [
    "output",
    "running mean",
    "running var",
    "grad x",
    "grad weight",
    "grad bias",
];

#[test]
fn matches_pytorch() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/batch_norm_torch.safetensors");
    let f = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for (case, relu) in [("bn2d", false), ("bn2d_relu", true), ("bn1d", false)] {
        let t = |k: &str| f[format!("{case}.{k}").as_str()].clone();
        let c = t("weight").dim(0).unwrap();
        let got = run(c, &t("x"), &t("r"), &t("weight"), &t("bias"), relu, true);
        let want = ["y", "running_mean", "running_var", "grad.x", "grad.weight", "grad.bias"].map(t);
        for ((g, w), what) in got.iter().zip(&want).zip(WHAT) {
            let d = max_diff(g, w);
            assert!(d < 1e-6, "{case}: {what} differs from PyTorch's by {d}");
        }
    }
}

#[test]
fn matches_candle_on_random_shapes() {
    let mut rng = Rng::new(7);
    let shapes: [&[usize]; 7] = [
        &[2, 3, 4, 5],
        &[1, 16, 8, 8],
        &[5, 7, 3, 1],
        &[3, 17, 2, 9],
        &[64, 5],
        &[1, 4, 2],
        &[300, 3, 11, 7],
    ];
    for shape in shapes {
        for relu in [false, true] {
            let c = shape[1];
            let x = random(&mut rng, shape, 1.5, 0.7);
            let r = random(&mut rng, shape, 1.0, 0.0);
            let w = random(&mut rng, &[c], 0.5, 1.0);
            let b = random(&mut rng, &[c], 0.5, 0.0);
            let ours = run(c, &x, &r, &w, &b, relu, true);
            let theirs = run(c, &x, &r, &w, &b, relu, false);
            for ((o, t), what) in ours.iter().zip(&theirs).zip(WHAT) {
                let d = max_diff(o, t);
                let scale = max_diff(t, &t.zeros_like().unwrap()).max(1.0);
                assert!(
                    d < 1e-4 * scale,
                    "{shape:?} relu {relu}: {what} differs from candle's by {d}"
                );
            }
        }
    }
}

/// d loss / d p by central differences in f64, against the op's gradient, for x, weight and bias.
#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(3);
    for (shape, relu) in [
        (&[3usize, 2, 2, 3][..], false),
        (&[4, 3, 5][..], true),
        (&[5, 2][..], false),
    ] {
        let c = shape[1];
        let f64t = |t: Tensor| t.to_dtype(DType::F64).unwrap();
        let x = f64t(random(&mut rng, shape, 1.0, 0.5));
        let r = f64t(random(&mut rng, shape, 1.0, 0.0));
        let w = f64t(random(&mut rng, &[c], 0.3, 1.0));
        let b = f64t(random(&mut rng, &[c], 0.3, 0.0));
        // The op itself in f64 (the layer's vars are f32).
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> f64 {
            let op = cpu::Train {
                eps: EPS,
                relu,
                stats: Default::default(),
            };
            let y = x.apply_op3(w, b, op).unwrap();
            (y * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let (xv, wv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let op = cpu::Train {
            eps: EPS,
            relu,
            stats: Default::default(),
        };
        let y = xv.as_tensor().apply_op3(wv.as_tensor(), bv.as_tensor(), op).unwrap();
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (which, v) in [("x", &xv), ("weight", &wv), ("bias", &bv)] {
            let g: Vec<f64> = grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let v0: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..v0.len() {
                let at = |d: f64| {
                    let mut p = v0.clone();
                    p[i] += d;
                    let p = Tensor::from_vec(p, v.as_tensor().shape(), &Device::Cpu).unwrap();
                    match which {
                        "x" => loss(&p, &w, &b),
                        "weight" => loss(&x, &p, &b),
                        _ => loss(&x, &w, &p),
                    }
                };
                let h = 1e-6;
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{shape:?} {which}[{i}]: op {} vs fd {fd}",
                    g[i]
                );
            }
        }
    }
}

/// The sums are grouped by shape, not by thread: one thread and three give the same bits.
#[test]
fn same_bits_at_any_thread_count() {
    let mut rng = Rng::new(11);
    let shape = [96, 8, 9, 9];
    let x = random(&mut rng, &shape, 2.0, 1.0);
    let r = random(&mut rng, &shape, 1.0, 0.0);
    let w = random(&mut rng, &[8], 0.5, 1.0);
    let b = random(&mut rng, &[8], 0.5, 0.0);
    let at = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| run(8, &x, &r, &w, &b, true, true))
    };
    let (one, three) = (at(1), at(3));
    for ((a, b), what) in one.iter().zip(&three).zip(WHAT) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what} differs between 1 and 3 threads"
        );
    }
}

#[test]
fn one_value_per_channel_is_an_error() {
    let w = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let (_, bn) = layer(3, &w, &w.zeros_like().unwrap());
    let x = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
    let err = bn.forward_t(&x, true).unwrap_err().to_string();
    assert!(err.contains("more than one value per channel"), "{err}");
    // Evaluation uses the running statistics: one sample is fine.
    assert!(bn.forward_t(&x, false).is_ok());
}
