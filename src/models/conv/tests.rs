//! Both routes (the CPU GEMM ops, and the library route the GPU takes, run here on the CPU)
//! against candle's own `conv2d` and its backward where candle can express the convolution, against
//! direct loops in f64 everywhere (AN4's per-axis strides and paddings included), and the CPU ops
//! against finite differences.
//!
//! Tolerance: f32 results within 1e-4 of the reference, relative to the reference's largest
//! magnitude (sums of up to a few hundred products); f64 within 1e-9.

use super::{conv2d, cpu, library, ConvParams};
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};

type Route = fn(&Tensor, &Tensor, ConvParams) -> candle_core::Result<Tensor>;
const ROUTES: [(&str, Route); 2] = [("cpu", cpu::conv2d), ("library", library::conv2d)];

/// (input [N, C, H, W], kernel [O, C, KH, KW], params): every case is small.
fn cases() -> Vec<([usize; 4], [usize; 4], ConvParams)> {
    let sq = ConvParams::square;
    vec![
        ([2, 3, 8, 8], [5, 3, 3, 3], sq(1, 1)),
        ([1, 5, 7, 9], [7, 5, 3, 3], sq(2, 1)),
        ([3, 7, 6, 5], [3, 7, 1, 1], sq(1, 0)),
        ([2, 4, 9, 6], [6, 4, 1, 1], sq(2, 0)),
        ([1, 3, 5, 8], [2, 3, 3, 3], sq(2, 0)),
        ([4, 2, 4, 4], [17, 2, 3, 3], sq(1, 0)),
        ([2, 6, 10, 7], [9, 6, 3, 3], sq(2, 1)),
        // 100 output positions a sample: groups of 6 samples share a GEMM, the last group holds one.
        ([7, 2, 10, 10], [3, 2, 3, 3], sq(1, 1)),
        // 1024 positions: one sample a group, four groups.
        ([4, 1, 32, 32], [2, 1, 1, 1], sq(1, 0)),
    ]
}

/// The AN4 model's two convolutions, on inputs small enough for direct loops.
fn an4_cases() -> Vec<([usize; 4], [usize; 4], ConvParams)> {
    vec![
        (
            [2, 1, 45, 12],
            [3, 1, 41, 11],
            ConvParams {
                stride: (2, 2),
                padding: (20, 5),
            },
        ),
        (
            [1, 3, 23, 9],
            [2, 3, 21, 11],
            ConvParams {
                stride: (2, 1),
                padding: (10, 5),
            },
        ),
    ]
}

fn random(shape: [usize; 4], dtype: DType, r: &mut Rng) -> Tensor {
    let v: Vec<f64> = (0..shape.iter().product()).map(|_| r.normal() as f64).collect();
    Tensor::from_vec(v, shape.to_vec(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A tensor's values as f64, flattened (the models' tests compare these).
pub(in crate::models) fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst <= tol * scale, "{what}: max |diff| {worst} > {tol} x {scale}");
}

/// Output, input gradient and weight gradient of loss = sum(conv(x, w) * r).
fn run(route: Route, x: &Tensor, w: &Tensor, r: &Tensor, p: ConvParams) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let y = route(xv.as_tensor(), wv.as_tensor(), p).unwrap();
    let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |v: &Var| flat(g.get(v.as_tensor()).expect("a gradient"));
    (flat(&y), grad(&xv), grad(&wv))
}

/// The same three by direct loops in f64.
fn direct(x: &Tensor, w: &Tensor, r: &Tensor, p: ConvParams) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let g = super::geometry::Geometry::new(x.dims(), w.dims(), p).unwrap();
    let (xs, ws, rs) = (flat(x), flat(w), flat(r));
    let mut y = vec![0.0; g.n * g.o * g.l()];
    let (mut dx, mut dw) = (vec![0.0; xs.len()], vec![0.0; ws.len()]);
    for n in 0..g.n {
        for o in 0..g.o {
            for u in 0..g.oh {
                for v in 0..g.ow {
                    let yi = ((n * g.o + o) * g.oh + u) * g.ow + v;
                    for c in 0..g.c {
                        for a in 0..g.kh {
                            for b in 0..g.kw {
                                let (iy, ix) = (
                                    (u * g.sh + a) as isize - g.ph as isize,
                                    (v * g.sw + b) as isize - g.pw as isize,
                                );
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let xi = ((n * g.c + c) * g.h + iy as usize) * g.w + ix as usize;
                                let wi = ((o * g.c + c) * g.kh + a) * g.kw + b;
                                y[yi] += xs[xi] * ws[wi];
                                dx[xi] += rs[yi] * ws[wi];
                                dw[wi] += rs[yi] * xs[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (y, dx, dw)
}

#[test]
fn both_routes_match_candle_conv2d_and_its_backward() {
    let mut rng = Rng::new(11);
    for (xs, ks, p) in cases() {
        let (s, pad) = (p.stride.0, p.padding.0);
        // candle's conv2d backward fails when the stride leaves different remainders on the two
        // axes (its conv_transpose2d takes one output padding): those cases meet direct loops only.
        if (xs[2] + 2 * pad - ks[2]) % s != (xs[3] + 2 * pad - ks[3]) % s {
            continue;
        }
        let (x, w) = (random(xs, DType::F32, &mut rng), random(ks, DType::F32, &mut rng));
        let candle_route: Route = |x, w, p| x.conv2d(w, p.padding.0, p.stride.0, 1, 1);
        let y_shape = x.conv2d(&w, pad, s, 1, 1).unwrap().dims4().unwrap();
        let r = random([y_shape.0, y_shape.1, y_shape.2, y_shape.3], DType::F32, &mut rng);
        let want = run(candle_route, &x, &w, &r, p);
        for (name, route) in ROUTES {
            let got = run(route, &x, &w, &r, p);
            let what = format!("{name} {xs:?} * {ks:?} {p:?}");
            assert_close(&got.0, &want.0, 1e-4, &format!("{what}: output"));
            assert_close(&got.1, &want.1, 1e-4, &format!("{what}: input gradient"));
            assert_close(&got.2, &want.2, 1e-4, &format!("{what}: weight gradient"));
        }
    }
}

#[test]
fn both_routes_match_direct_loops_with_per_axis_stride_and_padding() {
    let mut rng = Rng::new(12);
    let mut all = cases();
    all.extend(an4_cases());
    for (xs, ks, p) in all {
        let (x, w) = (random(xs, DType::F64, &mut rng), random(ks, DType::F64, &mut rng));
        let y = cpu::conv2d(&x, &w, p).unwrap().dims4().unwrap();
        let r = random([y.0, y.1, y.2, y.3], DType::F64, &mut rng);
        let want = direct(&x, &w, &r, p);
        for (name, route) in ROUTES {
            let got = run(route, &x, &w, &r, p);
            let what = format!("{name} {xs:?} * {ks:?} {p:?}");
            assert_close(&got.0, &want.0, 1e-9, &format!("{what}: output"));
            assert_close(&got.1, &want.1, 1e-9, &format!("{what}: input gradient"));
            assert_close(&got.2, &want.2, 1e-9, &format!("{what}: weight gradient"));
        }
        // f32 through the dispatching entry point, on whatever pool the test thread has.
        let (x32, w32, r32) = (
            x.to_dtype(DType::F32).unwrap(),
            w.to_dtype(DType::F32).unwrap(),
            r.to_dtype(DType::F32).unwrap(),
        );
        let got = run(conv2d, &x32, &w32, &r32, p);
        assert_close(&got.1, &want.1, 1e-4, &format!("f32 {xs:?}: input gradient"));
        assert_close(&got.2, &want.2, 1e-4, &format!("f32 {xs:?}: weight gradient"));
    }
}

/// Central differences of loss = sum(conv(x, w) * r) in f64 against the CPU op's gradients.
#[test]
fn cpu_gradients_match_finite_differences() {
    let mut rng = Rng::new(13);
    let p = ConvParams {
        stride: (2, 1),
        padding: (1, 0),
    };
    for (xs, ks, p) in [
        ([2, 3, 5, 4], [2, 3, 3, 2], p),
        ([1, 2, 6, 7], [3, 2, 3, 3], ConvParams::square(2, 1)),
    ] {
        let (x, w) = (random(xs, DType::F64, &mut rng), random(ks, DType::F64, &mut rng));
        let y = cpu::conv2d(&x, &w, p).unwrap().dims4().unwrap();
        let r = random([y.0, y.1, y.2, y.3], DType::F64, &mut rng);
        let (_, dx, dw) = run(cpu::conv2d, &x, &w, &r, p);
        let loss = |x: &[f64], w: &[f64]| -> f64 {
            let xt = Tensor::from_slice(x, xs.to_vec(), &Device::Cpu).unwrap();
            let wt = Tensor::from_slice(w, ks.to_vec(), &Device::Cpu).unwrap();
            let y = cpu::conv2d(&xt, &wt, p).unwrap();
            (y * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let (xv, wv) = (flat(&x), flat(&w));
        let eps = 1e-5;
        let numeric = |v: &[f64], at: usize, is_x: bool| {
            let (mut up, mut dn) = (v.to_vec(), v.to_vec());
            up[at] += eps;
            dn[at] -= eps;
            let (lu, ld) = if is_x {
                (loss(&up, &wv), loss(&dn, &wv))
            } else {
                (loss(&xv, &up), loss(&xv, &dn))
            };
            (lu - ld) / (2.0 * eps)
        };
        let fd_x: Vec<f64> = (0..xv.len()).map(|i| numeric(&xv, i, true)).collect();
        let fd_w: Vec<f64> = (0..wv.len()).map(|i| numeric(&wv, i, false)).collect();
        assert_close(&dx, &fd_x, 1e-7, &format!("{xs:?}: input gradient"));
        assert_close(&dw, &fd_w, 1e-7, &format!("{xs:?}: weight gradient"));
    }
}

/// The CPU op's parallel split (groups of samples over threads, or one group's GEMM over threads)
/// does not change its results beyond rounding.
#[test]
fn thread_counts_agree() {
    let mut rng = Rng::new(14);
    // One group of 5; one sample; four groups of 57 samples, the last of 1 (9 positions a sample).
    for xs in [[5, 4, 6, 6], [1, 4, 6, 6], [172, 4, 6, 6]] {
        let (x, w) = (
            random(xs, DType::F32, &mut rng),
            random([6, 4, 3, 3], DType::F32, &mut rng),
        );
        let r = random([xs[0], 6, 3, 3], DType::F32, &mut rng);
        let p = ConvParams::square(2, 1);
        let at = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| run(cpu::conv2d, &x, &w, &r, p))
        };
        let (one, three) = (at(1), at(3));
        assert_close(&three.0, &one.0, 1e-5, "output");
        assert_close(&three.1, &one.1, 1e-5, "input gradient");
        assert_close(&three.2, &one.2, 1e-5, "weight gradient");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let e = conv2d(&x, &w, ConvParams::square(1, 0)).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
    let w = Tensor::zeros((2, 3, 7, 3), DType::F32, &Device::Cpu).unwrap();
    let e = conv2d(&x, &w, ConvParams::square(1, 1)).unwrap_err().to_string();
    assert!(e.contains("larger than the padded input"), "{e}");
}
