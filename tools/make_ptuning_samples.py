"""
Generate the small sample data sets used by ptuning/ (train.sh, train_chat.sh).

    python tools/make_ptuning_samples.py

writes ptuning/data/adgen_sample/{train,dev}.json (ADGEN-style advertising copy)
and ptuning/data/chat_sample/{train,dev}.json (multi-turn shop customer service).
Every word comes from the hand-written vocabularies below; the output is
deterministic (random.Random(0)), so re-running reproduces the files byte-for-byte.
"""

import json
import os
import re
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from runtime import ROOT  # noqa: E402

DATA = os.path.join(ROOT, "ptuning", "data")

# -----------------------------------------------------------------------------
# ADGEN-style advertising copy: content = "key#value*key#value...", summary = ad text

# per key: {value: short selling point}; each key also has a few clause templates below
COLOR = {"白色": "清爽干净", "黑色": "经典耐看", "米色": "温柔低调", "卡其色": "复古耐看",
         "藏青色": "沉稳大气", "灰色": "高级内敛", "粉色": "甜美减龄", "红色": "热情提气色",
         "绿色": "清新自然", "蓝色": "明朗舒爽", "杏色": "温暖柔和", "酒红色": "优雅显白"}
STYLE = {"休闲": "轻松随性", "通勤": "干练利落", "简约": "干净大方", "复古": "有怀旧韵味",
         "甜美": "俏皮可爱", "文艺": "温柔有书卷气", "街头": "个性又潮流", "优雅": "知性从容",
         "运动": "活力十足", "清新": "自然舒适"}
PATTERN = {"条纹": "层次丰富又显瘦", "格子": "规整有学院气息", "纯色": "简洁百搭", "碎花": "浪漫灵动",
           "印花": "吸睛又有趣味", "刺绣": "精致有细节", "字母": "时髦有态度"}
CLOTH = {"棉": "柔软亲肤，透气吸汗", "雪纺": "轻盈飘逸，垂感出众", "牛仔": "挺括耐穿，越洗越有味道",
         "针织": "柔软有弹性，贴身舒适", "亚麻": "透气清爽，自带松弛感", "真丝": "顺滑细腻，泛着柔和光泽",
         "羊毛": "保暖细腻，不扎皮肤", "涤纶": "挺括有型，不易起皱"}
LEATHER = {"牛皮": "细腻耐磨，越用越有光泽", "帆布": "轻便透气，耐脏好打理", "羊皮": "柔软轻盈，手感细腻",
           "人造革": "轻便防水，好打理", "麂皮": "绒面细腻，质感高级"}
TOP = {  # 类型#上衣
    "衣样式": {"衬衫": "", "T恤": "", "卫衣": "", "毛衣": "", "外套": "", "针织衫": "", "风衣": ""},
    "版型": {"宽松": "遮肉又不挑身材", "修身": "贴合身形，勾勒利落线条", "直筒": "利落不拘束", "短款": "提高腰线，显得腿长"},
    "衣领型": {"翻领": "精神干练", "圆领": "简单百搭", "V领": "拉长颈部线条", "立领": "挺括有型",
             "高领": "保暖又显气质", "连帽": "随性减龄"},
    "袖长": {"短袖": "清爽透气", "长袖": "一年三季都能穿", "七分袖": "露出纤细手腕", "无袖": "凉快又显手臂修长"},
    "袖型": {"泡泡袖": "甜美又修饰肩型", "灯笼袖": "灵动有造型感", "喇叭袖": "飘逸显手细", "落肩袖": "慵懒随性"},
    "衣门襟": {"单排扣": "规整大方", "拉链": "穿脱方便", "系带": "可调节松紧，灵动别致"},
}
SKIRT = {  # 类型#裙
    "裙型": {"A字": "", "百褶": "", "包臀": "", "鱼尾": "", "直筒": "", "伞": ""},
    "裙长": {"短裙": "俏皮显腿长", "中长裙": "遮住膝盖更得体", "长裙": "走动间裙摆摇曳"},
    "裙领型": {"V领": "拉长颈部线条", "圆领": "简单百搭", "方领": "露出锁骨更显气质", "一字领": "优雅又性感"},
    "裙袖长": {"无袖": "清凉又显手臂修长", "短袖": "清爽舒适", "长袖": "春秋都能穿"},
    "裙腰型": {"高腰": "拉长下身比例", "松紧腰": "穿着无束缚"},
}
PANTS = {  # 类型#裤
    "裤型": {"阔腿裤": "", "直筒裤": "", "哈伦裤": "", "小脚裤": "", "喇叭裤": "", "工装裤": ""},
    "裤长": {"九分裤": "露出脚踝更显轻盈", "七分裤": "清爽利落", "长裤": "包裹双腿更显修长", "短裤": "活力清凉"},
    "裤腰型": {"高腰": "拉长腿部比例", "中腰": "舒适不勒肚", "松紧腰": "穿着无束缚"},
    "裤款式": {"破洞": "随性有个性", "口袋": "实用又有细节", "开叉": "走路更灵动", "卷边": "增添休闲感"},
}
SHOES = {  # 类型#鞋
    "鞋型": {"小白鞋": "", "乐福鞋": "", "马丁靴": "", "帆布鞋": "", "老爹鞋": "", "单鞋": "", "凉鞋": ""},
    "鞋跟": {"平底": "久走不累", "粗跟": "稳当又增高", "坡跟": "舒适又显高", "细跟": "优雅有女人味"},
    "鞋头": {"圆头": "不挤脚", "尖头": "拉长腿部线条", "方头": "复古有型"},
    "闭合方式": {"系带": "可调节松紧更贴脚", "一脚蹬": "穿脱省事", "魔术贴": "方便又牢固"},
}
BAG = {  # 类型#包
    "包型": {"托特包": "", "斜挎包": "", "双肩包": "", "水桶包": "", "腋下包": "", "手拿包": ""},
    "包大小": {"大号": "电脑雨伞都装得下", "中号": "日常小物收纳有余", "小号": "小巧精致不累赘"},
    "开合方式": {"拉链": "安全不易掉东西", "磁扣": "开合方便", "翻盖": "简洁又复古"},
}
# category -> (its keys, material vocab, patterns allowed, main key, how to name the item, closings)
CATEGORIES = {
    "上衣": (TOP, CLOTH, PATTERN, "衣样式", "{v}",
           ["单穿内搭都好看。", "日常出街或上班都能轻松驾驭！", "搭配牛仔裤或半身裙都很出彩。"]),
    "裙": (SKIRT, CLOTH, PATTERN, "裙型", "{v}裙",
          ["约会逛街都能美出新高度！", "轻松穿出好气质。", "搭配小白鞋或高跟鞋都合适。"]),
    "裤": (PANTS, CLOTH, PATTERN, "裤型", "{v}",
          ["搭配T恤或衬衫都很出彩。", "通勤休闲两相宜！", "轻松穿出大长腿。"]),
    "鞋": (SHOES, LEATHER, {"纯色": "简洁百搭", "拼色": "活泼有层次"}, "鞋型", "{v}",
          ["日常通勤久穿也舒适。", "搭配裙装裤装都合适！", "是鞋柜里的百搭单品。"]),
    "包": (BAG, LEATHER, {"纯色": "简洁百搭", "拼色": "活泼有层次", "字母": "时髦有态度"}, "包型", "{v}",
          ["上班约会都能拎出门。", "实用与颜值兼得！", "轻松提升整体造型感。"]),
}
OPENINGS = ["这款{noun}{sd}，{v}风格", "{v}风格的{noun}，{sd}", "走{v}路线的{noun}，整体{sd}"]
OPENINGS_PLAIN = ["这款{noun}设计用心", "一款实穿度很高的{noun}", "这款{noun}细节满满"]
CLAUSES = {  # generic clause templates: {v} = value, {d} = its selling point
    "颜色": ["{v}的配色{d}", "选用{v}，{d}", "{v}基调{d}"],
    "图案": ["{v}图案{d}", "点缀{v}元素，{d}", "{v}设计{d}"],
    "材质": ["{v}材质{d}", "选用优质{v}，{d}", "采用{v}打造，{d}"],
    "包大小": ["{v}容量{d}", "{v}尺寸刚刚好，{d}", "选择{v}，{d}"],
    "_": ["{v}设计{d}", "{v}的款式{d}", "采用{v}设计，{d}"],  # every other key
}


def clause(rng, key, v, d):
    return rng.choice(CLAUSES.get(key, CLAUSES["_"])).format(v=v, d=d)


def adgen_item(rng):
    cat = rng.choice(sorted(CATEGORIES))
    keys, material, pattern, main, naming, closings = CATEGORIES[cat]
    vocab = dict(keys, 材质=material, 图案=pattern, 颜色=COLOR, 风格=STYLE)
    optional = [k for k in sorted(vocab) if k != main]
    chosen = [main] + rng.sample(optional, rng.randint(3, min(6, len(optional))))
    attrs = {k: rng.choice(sorted(vocab[k])) for k in chosen}
    content = "*".join([f"类型#{cat}"] + [f"{k}#{attrs[k]}" for k in chosen])
    noun = naming.format(v=attrs[main])
    if "风格" in attrs:
        v = attrs["风格"]
        head = rng.choice(OPENINGS).format(noun=noun, v=v, sd=STYLE[v])
    else:
        head = rng.choice(OPENINGS_PLAIN).format(noun=noun)
    rest = [k for k in chosen if k not in (main, "风格")]
    rng.shuffle(rest)
    parts = [clause(rng, k, attrs[k], vocab[k][attrs[k]]) for k in rest]
    cut = len(parts) // 2  # two sentences: opening + first half, second half + closing
    summary = "，".join([head] + parts[:cut]) + "。" + "，".join(parts[cut:] + [rng.choice(closings)])
    return content, summary, attrs


def make_adgen(rng, n_train, n_dev):
    seen, items = set(), []
    while len(items) < n_train + n_dev:
        content, summary, attrs = adgen_item(rng)
        if content in seen or not 40 <= len(summary) <= 120:
            continue
        assert all(v in summary for v in attrs.values()), (content, summary)
        seen.add(content)  # unique contents => dev combinations never appear in train
        items.append({"content": content, "summary": summary})
    return items[:n_train], items[n_train:]

# -----------------------------------------------------------------------------
# multi-turn customer service chat for the fictional shop "小鹿优选"

ITEMS = ["卫衣", "衬衫", "连衣裙", "牛仔裤", "外套", "T恤", "针织衫", "运动鞋"]
COURIERS = ["顺丰", "圆通", "中通", "韵达", "京东快递"]
CITIES = ["杭州", "上海", "广州", "武汉", "成都", "北京", "南京", "西安"]
DEFECTS = ["线头", "污渍", "破洞", "掉色", "拉链坏了"]
COLORS = ["黑色", "白色", "灰色", "米色", "藏青色"]
HELLO = ["您好，", "亲，", "您好呀，"]


def size_for(h, w):
    sizes = ["S", "M", "L", "XL", "XXL"]
    i = sum(h > x for x in (155, 163, 170, 177)) + (w > (h - 105) * 1.1)
    return sizes[min(i, len(sizes) - 1)]


# Each flow: the shop's answers to a few questions asked one after another; each turn is (the ways a customer asks,
# the answer), filled in with the flow's draws.
LOGISTICS = [
    (["我的订单{oid}到哪了？", "帮我查下订单{oid}的物流", "订单{oid}怎么还没到？"],
     "订单{oid}已由{courier}发出，目前在{city}转运中心，预计{days}天内送达，请耐心等待。"),
    (["能指定送货时间吗？", "可以约个时间送吗？"],
     "快递员派送前会电话联系您，您可以和快递员约定方便的时间，也可以放到附近代收点。"),
    (["还能改收货地址吗？", "我想换个地址收货"],
     "包裹已经发出，后台无法修改地址，您可以联系{courier}客服申请改派，我们也会帮您备注。"),
    (["要是一直没到怎么办？", "超时没送到能赔吗？"],
     "超过{late}天仍未送达请联系我们，我们会向{courier}核实，确认丢件会为您补发或全额退款。"),
]
RETURN = [
    (["我买的{item}不太合适，能退吗？", "{item}想退货可以吗？", "收到的{item}不喜欢，怎么退？"],
     "可以的，签收后7天内且不影响二次销售的商品支持无理由退货，请在订单页点击申请退货。"),
    (["退货运费谁出？", "寄回去的运费要我付吗？"],
     "质量问题退货运费由我们承担；非质量问题需要您承担寄回运费，购买了运费险可自动理赔。"),
    (["退款多久到账？", "钱什么时候退回来？"],
     "仓库收到退货并验收后1到3个工作日内原路退款，银行卡可能稍有延迟，请留意账户。"),
    (["吊牌已经剪了还能退吗？", "穿过一次还能退吗？"],
     "很抱歉，吊牌已剪或穿着过的{item}会影响二次销售，无法办理无理由退货，质量问题除外。"),
]
SIZE = [
    (["我身高{h}厘米，体重{w}公斤，{item}穿什么码？", "{h}厘米{w}公斤，这款{item}选哪个码？"],
     "根据您的身高体重，这款{item}建议选择{size}码，如果喜欢宽松一点可以选大一码。"),
    (["会缩水吗？", "洗了会不会变小？"],
     "这款{item}出厂前做过预缩处理，建议冷水手洗或轻柔机洗，正常洗涤基本不会缩水。"),
    (["码数不合适可以换吗？", "{size}码穿着小了能换吗？"],
     "可以换码，签收后7天内在订单页申请换货即可，首次换码的寄回运费由我们承担。"),
]
CANCEL = [
    (["订单{oid}能取消吗？", "我想取消订单{oid}", "刚下的单{oid}不想要了"],
     "订单还未发货，可以在订单详情页直接点击取消，款项会在1到3个工作日内原路退回。"),
    (["那我不取消了，{item}能改成{color}吗？", "能把{item}换成{color}再发吗？"],
     "可以的，已为您把订单里的{item}备注为{color}，仓库会按新颜色发货，请放心。"),
    (["今天能发货吗？", "大概什么时候发货？"],
     "下午4点前付款的订单当天发出，之后的订单次日发出，发货后会短信通知您物流单号。"),
]
DEFECT = [
    (["收到的{item}有{defect}，怎么办？", "{item}刚到就发现{defect}"],
     "非常抱歉给您带来不便，请拍照上传到售后申请页，我们核实后为您免费换新或退款。"),
    (["需要我寄回去吗？", "东西要退回去吗？"],
     "需要的，审核通过后系统会为您预约上门取件，运费由我们承担，您不用垫付。"),
    (["换新的多久能到？", "重新发货要多久？"],
     "仓库收到退回的{item}后24小时内为您补发新品，一般2到4天就能送到。"),
]
INVOICE = [
    (["能开发票吗？", "可以开发票吗？", "买东西有发票吗？"],
     "可以开具电子普通发票，确认收货后在订单详情页点击申请开票，填写抬头和税号即可。"),
    (["发票多久能开好？", "开票要等多久？"],
     "提交申请后一般1到2个工作日开具，会发送到您填写的邮箱，也可以在订单页下载。"),
    (["抬头填错了能改吗？", "发票信息写错了怎么办？"],
     "可以的，在订单页申请重开发票并填写正确信息，原发票会自动作废，无需寄回。"),
]
COUPON = [
    (["优惠券怎么用不了？", "我的券为什么不能用？"],
     "这张券是满{full}减{cut}的，订单金额需要达到{full}元且商品参与活动才能使用。"),
    (["几张券能一起用吗？", "优惠券可以叠加吗？"],
     "同一订单只能使用一张店铺优惠券，但可以和平台满减活动叠加使用，结算时会自动计算。"),
    (["退货后券还能用吗？", "退款了优惠券会退回吗？"],
     "整单退货且券还在有效期内的，优惠券会自动退回您的账户；部分退货的优惠券不退回。"),
]


def turns(rng, flow, **draws):
    """A flow's (question, answer) turns: one way of asking each, both filled in with the draws."""
    return [(rng.choice(questions).format(**draws), answer.format(**draws)) for questions, answer in flow]


def order_id(rng):
    return f"LX{rng.randint(10000000, 99999999)}"


def flow_logistics(rng):
    oid, courier, city, days = order_id(rng), rng.choice(COURIERS), rng.choice(CITIES), rng.randint(1, 3)
    return turns(rng, LOGISTICS, oid=oid, courier=courier, city=city, days=days, late=days + 3)


def flow_return(rng):
    return turns(rng, RETURN, item=rng.choice(ITEMS))


def flow_size(rng):
    item, h, w = rng.choice(ITEMS[:7]), rng.randint(150, 185), rng.randint(40, 85)
    return turns(rng, SIZE, item=item, h=h, w=w, size=size_for(h, w))


def flow_cancel(rng):
    oid, color, item = order_id(rng), rng.choice(COLORS), rng.choice(ITEMS)
    return turns(rng, CANCEL, oid=oid, color=color, item=item)


def flow_defect(rng):
    item, defect = rng.choice(ITEMS), rng.choice(DEFECTS)
    return turns(rng, DEFECT, item=item, defect=defect)


def flow_invoice(rng):
    return turns(rng, INVOICE)


def flow_coupon(rng):
    full, cut = rng.choice([(99, 10), (199, 20), (299, 40), (399, 60)])
    return turns(rng, COUPON, full=full, cut=cut)


FLOWS = [flow_logistics, flow_return, flow_size, flow_cancel, flow_defect, flow_invoice, flow_coupon]


def chat_item(rng):
    turns = rng.choice(FLOWS)(rng)
    n = rng.choice([1, 2, 2, 3, 3, 4])  # 1 => empty history; otherwise 1-3 earlier turns
    turns = [(q, rng.choice(HELLO) + a if i == 0 else a) for i, (q, a) in enumerate(turns[:n])]
    (prompt, response), history = turns[-1], [list(t) for t in turns[:-1]]
    return {"prompt": prompt, "response": response, "history": history}


def make_chat(rng, n_train, n_dev):
    seen, items = set(), []
    while len(items) < n_train + n_dev:
        it = chat_item(rng)
        key = json.dumps([it["prompt"], it["history"]], ensure_ascii=False)  # one answer per context
        if key in seen or not 20 <= len(it["response"]) <= 100:
            continue
        seen.add(key)
        items.append(it)
    return items[:n_train], items[n_train:]

# -----------------------------------------------------------------------------


def check_text(s):
    assert not re.search(r"[,!:;?]", s), s  # Chinese punctuation only


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):4d} lines to {os.path.relpath(path, ROOT)}")


def main():
    rng = random.Random(0)
    train, dev = make_adgen(rng, 320, 80)
    for r in train + dev:
        check_text(r["summary"])
    write_jsonl(os.path.join(DATA, "adgen_sample", "train.json"), train)
    write_jsonl(os.path.join(DATA, "adgen_sample", "dev.json"), dev)
    train, dev = make_chat(rng, 80, 20)
    for r in train + dev:
        for s in [r["prompt"], r["response"]] + [x for h in r["history"] for x in h]:
            check_text(s)
    write_jsonl(os.path.join(DATA, "chat_sample", "train.json"), train)
    write_jsonl(os.path.join(DATA, "chat_sample", "dev.json"), dev)


if __name__ == "__main__":
    main()
