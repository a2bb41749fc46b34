//! The iteration order of libstdc++'s `std::unordered_map` and `std::unordered_set`, for
//! answers whose order Nix clients show to users.
//!
//! nix-daemon answers FindRoots from a `std::unordered_map<StorePath,
//! std::unordered_set<std::string>>` in its iteration order, and the client (`nix-store -q
//! --roots`) puts what it reads into a map of the same type and prints in *its* iteration
//! order, which depends on the order it was filled in. So a daemon that wants the client to
//! print what it prints against nix-daemon must fill a map the way nix-daemon does (same keys,
//! same order) and send it in libstdc++'s iteration order. [`CxxMap`] reproduces that order:
//! the single linked list of nodes, the "before" pointer of each bucket, new nodes at the
//! front of their bucket (or of the list when the bucket is empty), the prime rehash policy
//! (max load factor 1, 13 buckets at the first insert, then at least twice as many, primes
//! from libstdc++'s table) and the rehash that walks the old list. Hashes: [`store_path_hash`]
//! (Nix's `std::hash<StorePath>`) and [`string_hash`] (`std::hash<std::string>`).

use std::collections::HashMap;
use std::hash::Hash;

/// `std::hash<nix::StorePath>`: the first 8 bytes of the base name (hash part), as a
/// little-endian word.
pub fn store_path_hash(base_name: &str) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(base_name.bytes()) {
        *d = s;
    }
    u64::from_le_bytes(b)
}

/// `std::hash<std::string>`: libstdc++'s `_Hash_bytes` (64-bit) with seed `0xc70f6907`.
pub fn string_hash(s: &[u8]) -> u64 {
    const MUL: u64 = (0xc6a4_a793_u64 << 32) + 0x5bd1_e995;
    let shift_mix = |v: u64| v ^ (v >> 47);
    let mut hash = 0xc70f_6907_u64 ^ (s.len() as u64).wrapping_mul(MUL);
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let data = shift_mix(u64::from_le_bytes(w).wrapping_mul(MUL)).wrapping_mul(MUL);
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        hash ^= u64::from_le_bytes(w);
        hash = hash.wrapping_mul(MUL);
    }
    hash = shift_mix(hash).wrapping_mul(MUL);
    shift_mix(hash)
}

/// libstdc++'s `__prime_list` (64-bit `unsigned long`), as its `_M_next_bkt` reads it.
const PRIMES: [u64; 305] = [
    2,
    3,
    5,
    7,
    11,
    13,
    17,
    19,
    23,
    29,
    31,
    37,
    41,
    43,
    47,
    53,
    59,
    61,
    67,
    71,
    73,
    79,
    83,
    89,
    97,
    103,
    109,
    113,
    127,
    137,
    139,
    149,
    157,
    167,
    179,
    193,
    199,
    211,
    227,
    241,
    257,
    277,
    293,
    313,
    337,
    359,
    383,
    409,
    439,
    467,
    503,
    541,
    577,
    619,
    661,
    709,
    761,
    823,
    887,
    953,
    1031,
    1109,
    1193,
    1289,
    1381,
    1493,
    1613,
    1741,
    1879,
    2029,
    2179,
    2357,
    2549,
    2753,
    2971,
    3209,
    3469,
    3739,
    4027,
    4349,
    4703,
    5087,
    5503,
    5953,
    6427,
    6949,
    7517,
    8123,
    8783,
    9497,
    10273,
    11113,
    12011,
    12983,
    14033,
    15173,
    16411,
    17749,
    19183,
    20753,
    22447,
    24281,
    26267,
    28411,
    30727,
    33223,
    35933,
    38873,
    42043,
    45481,
    49201,
    53201,
    57557,
    62233,
    67307,
    72817,
    78779,
    85229,
    92203,
    99733,
    107897,
    116731,
    126271,
    136607,
    147793,
    159871,
    172933,
    187091,
    202409,
    218971,
    236897,
    256279,
    277261,
    299951,
    324503,
    351061,
    379787,
    410857,
    444487,
    480881,
    520241,
    562841,
    608903,
    658753,
    712697,
    771049,
    834181,
    902483,
    976369,
    1056323,
    1142821,
    1236397,
    1337629,
    1447153,
    1565659,
    1693859,
    1832561,
    1982627,
    2144977,
    2320627,
    2510653,
    2716249,
    2938679,
    3179303,
    3439651,
    3721303,
    4026031,
    4355707,
    4712381,
    5098259,
    5515729,
    5967347,
    6456007,
    6984629,
    7556579,
    8175383,
    8844859,
    9569143,
    10352717,
    11200489,
    12117689,
    13109983,
    14183539,
    15345007,
    16601593,
    17961079,
    19431899,
    21023161,
    22744717,
    24607243,
    26622317,
    28802401,
    31160981,
    33712729,
    36473443,
    39460231,
    42691603,
    46187573,
    49969847,
    54061849,
    58488943,
    63278561,
    68460391,
    74066549,
    80131819,
    86693767,
    93793069,
    101473717,
    109783337,
    118773397,
    128499677,
    139022417,
    150406843,
    162723577,
    176048909,
    190465427,
    206062531,
    222936881,
    241193053,
    260944219,
    282312799,
    305431229,
    330442829,
    357502601,
    386778277,
    418451333,
    452718089,
    489790921,
    529899637,
    573292817,
    620239453,
    671030513,
    725980837,
    785430967,
    849749479,
    919334987,
    994618837,
    1076067617,
    1164186217,
    1259520799,
    1362662261,
    1474249943,
    1594975441,
    1725587117,
    1866894511,
    2019773507,
    2185171673,
    2364114217,
    2557710269,
    2767159799,
    2993761039,
    3238918481,
    3504151727,
    3791104843,
    4101556399,
    4294967291,
    6442450933,
    8589934583,
    12884901857,
    17179869143,
    25769803693,
    34359738337,
    51539607367,
    68719476731,
    103079215087,
    137438953447,
    206158430123,
    274877906899,
    412316860387,
    549755813881,
    824633720731,
    1099511627689,
    1649267441579,
    2199023255531,
    3298534883309,
    4398046511093,
    6597069766607,
    8796093022151,
    13194139533241,
    17592186044399,
    26388279066581,
    35184372088777,
    52776558133177,
    70368744177643,
    105553116266399,
    140737488355213,
    211106232532861,
    281474976710597,
    562949953421231,
    1125899906842597,
    2251799813685119,
    4503599627370449,
    9007199254740881,
    18014398509481951,
    36028797018963913,
    72057594037927931,
    144115188075855859,
    288230376151711717,
    576460752303423433,
    1152921504606846883,
    2305843009213693951,
    4611686018427387847,
    9223372036854775783,
    18446744073709551557,
    18446744073709551557,
];

/// `_Prime_rehash_policy::_M_next_bkt`'s table for small requests.
const FAST_BKT: [u64; 14] = [2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13];

/// Where a bucket's nodes begin: after the list head or after a node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Before {
    Head,
    Node(usize),
}

/// A map that remembers libstdc++'s iteration order for the same insertions. Keys are never
/// removed (no caller needs it).
#[derive(Debug)]
pub struct CxxMap<K, V> {
    hasher: fn(&K) -> u64,
    keys: Vec<K>,
    values: Vec<V>,
    hashes: Vec<u64>,
    next: Vec<Option<usize>>,
    head: Option<usize>,
    buckets: Vec<Option<Before>>,
    next_resize: u64,
    index: HashMap<K, usize>,
}

/// A set in libstdc++'s iteration order.
pub type CxxSet<K> = CxxMap<K, ()>;

impl<K: Clone + Eq + Hash, V> CxxMap<K, V> {
    /// An empty map hashing its keys with `hasher` (one bucket, as a default-constructed
    /// `std::unordered_map`).
    pub fn new(hasher: fn(&K) -> u64) -> Self {
        CxxMap {
            hasher,
            keys: Vec::new(),
            values: Vec::new(),
            hashes: Vec::new(),
            next: Vec::new(),
            head: None,
            buckets: vec![None],
            next_resize: 0,
            index: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `map[key]`: the value, inserted with `make` if the key is new.
    pub fn entry_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None => self.insert_new(key, make()),
        };
        &mut self.values[i]
    }

    /// In iteration order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        let mut p = self.head;
        std::iter::from_fn(move || {
            let i = p?;
            p = self.next[i];
            Some((&self.keys[i], &self.values[i]))
        })
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.iter().map(|(k, _)| k)
    }

    fn next_of(&self, b: Before) -> Option<usize> {
        match b {
            Before::Head => self.head,
            Before::Node(i) => self.next[i],
        }
    }

    fn set_next(&mut self, b: Before, to: Option<usize>) {
        match b {
            Before::Head => self.head = to,
            Before::Node(i) => self.next[i] = to,
        }
    }

    fn bucket(&self, hash: u64) -> usize {
        (hash % self.buckets.len() as u64) as usize
    }

    fn insert_new(&mut self, key: K, value: V) -> usize {
        let hash = (self.hasher)(&key);
        if let Some(n) = self.need_rehash(self.keys.len() as u64, 1) {
            self.rehash(n);
        }
        let i = self.keys.len();
        self.index.insert(key.clone(), i);
        self.keys.push(key);
        self.values.push(value);
        self.hashes.push(hash);
        self.next.push(None);
        // _M_insert_bucket_begin
        let bkt = self.bucket(hash);
        match self.buckets[bkt] {
            Some(before) => {
                self.next[i] = self.next_of(before);
                self.set_next(before, Some(i));
            }
            None => {
                self.next[i] = self.head;
                self.head = Some(i);
                if let Some(n) = self.next[i] {
                    let b = self.bucket(self.hashes[n]);
                    self.buckets[b] = Some(Before::Node(i));
                }
                self.buckets[bkt] = Some(Before::Head);
            }
        }
        i
    }

    /// `_Prime_rehash_policy::_M_need_rehash` with a max load factor of 1.
    fn need_rehash(&mut self, n_elt: u64, n_ins: u64) -> Option<u64> {
        let n_bkt = self.buckets.len() as u64;
        if n_elt + n_ins <= self.next_resize {
            return None;
        }
        let min_bkts = (n_elt + n_ins).max(if self.next_resize == 0 { 11 } else { 0 });
        if min_bkts >= n_bkt {
            return Some(self.next_bkt((min_bkts + 1).max(n_bkt * 2)));
        }
        self.next_resize = n_bkt;
        None
    }

    /// `_Prime_rehash_policy::_M_next_bkt`.
    fn next_bkt(&mut self, n: u64) -> u64 {
        if let Some(&b) = FAST_BKT.get(n as usize) {
            if n == 0 {
                return 1;
            }
            self.next_resize = b;
            return b;
        }
        // lower_bound over [6, last prime), where the last prime is PRIMES[303].
        let last = PRIMES.len() - 2;
        let i = 6 + PRIMES[6..last].partition_point(|&p| p < n);
        self.next_resize = if i == last { u64::MAX } else { PRIMES[i] };
        PRIMES[i]
    }

    /// `_M_rehash_aux` for unique keys: the old list walked in order, each node put at the
    /// front of its new bucket, or of the list when the bucket is empty.
    fn rehash(&mut self, n: u64) {
        let mut buckets: Vec<Option<Before>> = vec![None; n as usize];
        let mut p = self.head;
        self.head = None;
        let mut bbegin_bkt = 0usize;
        while let Some(i) = p {
            let next = self.next[i];
            let bkt = (self.hashes[i] % n) as usize;
            match buckets[bkt] {
                None => {
                    self.next[i] = self.head;
                    self.head = Some(i);
                    buckets[bkt] = Some(Before::Head);
                    if self.next[i].is_some() {
                        buckets[bbegin_bkt] = Some(Before::Node(i));
                    }
                    bbegin_bkt = bkt;
                }
                Some(before) => {
                    self.next[i] = self.next_of(before);
                    self.set_next(before, Some(i));
                }
            }
            p = next;
        }
        self.buckets = buckets;
    }
}

impl<K: Clone + Eq + Hash> CxxSet<K> {
    /// `set.insert(key)`.
    pub fn insert(&mut self, key: K) {
        self.entry_or_insert_with(key, || ());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings() -> CxxSet<String> {
        CxxSet::new(|s: &String| string_hash(s.as_bytes()))
    }

    /// What `nix-store -q --roots` prints after reading `wire` (link, target) pairs.
    fn client(wire: &[(String, String)]) -> Vec<(String, String)> {
        let mut m: CxxMap<String, CxxSet<String>> = CxxMap::new(|s: &String| store_path_hash(s));
        for (l, t) in wire {
            m.entry_or_insert_with(t.clone(), strings).insert(l.clone());
        }
        m.iter()
            .flat_map(|(t, ls)| ls.keys().map(move |l| (l.clone(), t.clone())))
            .collect()
    }

    /// Values printed by `std::hash<std::string>{}(s)` (GCC 12, x86_64).
    #[test]
    fn string_hash_is_libstdcxx() {
        for (s, h) in [
            ("", 0x553e_9390_1e46_2a6e_u64),
            ("a", 0x454d_dee4_88c1_ed6b),
            ("hello", 0x2655_3298_fdbe_39c8),
            ("/nix/var/nix/gcroots/perm-a", 0xcf91_4f25_0378_4545),
            ("{censored}", 0x4e2c_2666_7700_e9c6),
            ("12345678", 0x8c5b_90a3_3a04_dca5),
            ("123456789", 0xaaeb_28d3_d5f1_65c0),
        ] {
            assert_eq!(string_hash(s.as_bytes()), h, "{s:?}");
        }
    }

    /// The order a `std::unordered_set<std::string>` (GCC 12) iterates in after
    /// `for (i = 0; i < 200; i++) s.insert("k" + std::to_string(i * 7919 % 1000))`: 200 keys,
    /// through the rehashes to 29, 59, 127 and 257 buckets.
    #[test]
    fn set_order_is_libstdcxx() {
        let mut s = strings();
        for i in 0..200u64 {
            s.insert(format!("k{}", i * 7919 % 1000));
        }
        let got: Vec<&str> = s.keys().map(String::as_str).collect();
        let want = "k205 k286 k529 k772 k15 k258 k339 k420 k501 k663 k744 k987 k311 k392 k473 k554 k635 k797 k959 k40 k202 k283 k607 k769 k850 k931 k174 k336 k417 k579 k741 k903 k984 k65 k146 k526 k227 k308 k389 k551 k632 k383 k691 k869 k545 k950 k433 k716 k31 k224 k657 k112 k582 k844 k367 k12 k548 k274 k707 k838 k598 k109 k177 k760 k271 k732 k59 k688 k411 k408 k595 k570 k517 k601 k922 k841 k352 k28 k495 k679 k919 k514 k461 k610 k355 k165 k90 k43 k246 k84 k757 k788 k193 k520 k190 k255 k816 k981 k956 k881 k96 k56 k906 k710 k149 k676 k825 k623 k947 k704 k330 k386 k299 k448 k791 k93 k218 k651 k866 k121 k685 k498 k813 k68 k626 k573 k140 k978 k713 k897 k735 k252 k953 k489 k894 k654 k442 k302 k249 k358 k87 k445 k6 k364 k436 k925 k763 k962 k124 k380 k439 k467 k168 k277 k196 k853 k115 k34 k822 k470 k604 k872 k629 k305 k143 k62 k0 k333 k280 k137 k900 k464 k542 k794 k819 k738 k221 k576 k414 k682 k118 k934 k171 k9 k928 k660 k327 k492 k3 k361 k230 k785 k847 k975 k766 k199 k523 k37 k878 k875";
        assert_eq!(got.join(" "), want);
    }

    #[test]
    fn roots_come_out_as_from_nix_daemon() {
        let f = |h: &str, n: &str| format!("{h}-{n}");
        let f1 = f("qazfmj8zyq4kqlnqfdrq6wizbv35zi66", "f1");
        let f2 = f("wwn18mar7mll91pwsz5nn7vd1hw3dbaz", "f2");
        let f3 = f("0pdnkxamim1vy6m11c1f6pa5380z9b0r", "f3");
        let f4 = f("q26wjv08613sgh8yi769m7v2vpaybq2n", "f4");
        let f5 = f("r5sff0sl1v2gkx7mkll5ma6y3qxrz7n5", "f5");
        let f6 = f("0fj6m6w2a09rnj3mxnccl06yg1k4mrm1", "f6");
        let f7 = f("bnklrbnrqsdqzmvynz7mxd1jv9hfqndd", "f7");
        let f8 = f("3bhcamnwvngf0038qz85a0p3zar40vv3", "f8");
        let g = "/nix/var/nix/gcroots";
        let l = "/nix/var/links";
        // The order nix-daemon finds them in (readdir order of a test instance).
        let found: Vec<(String, String)> = [
            (format!("{g}/zz-perm-h"), &f8),
            (format!("{g}/perm-a"), &f1),
            (format!("{g}/perm-b"), &f2),
            (format!("{l}/r1"), &f1),
            (format!("{l}/r5"), &f5),
            (format!("{l}/r6"), &f6),
            (format!("{l}/r4"), &f4),
            (format!("{l}/r6-again"), &f6),
            (format!("{l}/r7"), &f7),
            (format!("{g}/sub/perm-c"), &f1),
            (format!("{g}/sub/deeper/perm-d"), &f3),
            ("/nix/var/nix/profiles/profile-e".to_string(), &f3),
        ]
        .into_iter()
        .map(|(a, b)| (a, b.clone()))
        .collect();
        // nix-daemon's map filled in that order is what it sends; the client fills its own.
        let wire = client(&found);
        let printed = client(&wire);
        let want = [
            "gcroots/zz-perm-h",
            "gcroots/perm-a",
            "links/r1",
            "gcroots/sub/perm-c",
            "gcroots/perm-b",
            "links/r4",
            "links/r5",
            "links/r6",
            "links/r6-again",
            "links/r7",
            "gcroots/sub/deeper/perm-d",
            "profiles/profile-e",
        ];
        let got: Vec<&str> = printed.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(g.ends_with(w), "{got:?}");
        }
    }
}
